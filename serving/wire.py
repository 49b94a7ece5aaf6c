"""What crosses from the front to the encoder's BentoML routes: JSON only, never pickle.

BentoML's client between services speaks `application/vnd.bentoml+pickle` by default, and its own
refusal of pickle applies to the entry service alone, so an encoder reached over a network (each
service in its own pod) would unpickle whatever a caller sent. Here the front's client speaks JSON
(drain.py `pin_dependency`), arrays travel as base64 float32 (`pack_array`), and `RefusePickle`
answers 415 to any other body on the encoder. Images never take this path: they go raw over the
encoder's hop socket (hop.py), where nothing is unpickled either.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

JSON = "application/json"


def pack_array(a: Any) -> dict:
    """A float32 array as JSON-safe {"f32": base64 of its C-order bytes, "shape": [...]}."""
    a = np.ascontiguousarray(a, np.float32)
    return {"f32": base64.b64encode(a.tobytes()).decode("ascii"), "shape": list(a.shape)}


def unpack_array(d: Any) -> np.ndarray:
    """`pack_array`'s inverse; an array given as is (an in-process encoder) passes through."""
    if not isinstance(d, dict):
        return np.asarray(d, np.float32)
    flat = np.frombuffer(base64.b64decode(d["f32"]), np.float32)
    return flat.reshape([int(n) for n in d["shape"]])


class RefusePickle:
    """ASGI middleware for the encoder: a request with a body that is not JSON is 415, before
    BentoML deserialises anything (GET probes such as /readyz and /metrics carry no body)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
            # every Content-Type header: BentoML reads the first, a dict of them would keep the last
            ctypes = [v.decode("latin-1") for k, v in scope.get("headers") or () if k.lower() == b"content-type"]
            if len(ctypes) != 1 or ctypes[0].split(";")[0].strip().lower() != JSON:
                body = json.dumps({"error": "unsupported_media_type",
                                   "detail": "the encoder takes JSON only (no pickle)"}).encode()
                await send({"type": "http.response.start", "status": 415,
                            "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
