"""Reading a request body before anything else may hold a slot: a deadline, byte caps, JSON shape.

A client that announces a body and sends it slowly (or never) must cost the server nothing but a
connection: the body is read under its own deadline (`CLIPHEADS_BODY_TIMEOUT_S`, then 408) and only
a request whose body has arrived counts against the in-flight limit (guard.py). Bytes of bodies
still arriving are capped per request (`CLIPHEADS_MAX_BODY_BYTES`) and for the whole process
(`CLIPHEADS_MAX_UPLOAD_BYTES`, then 503), so many slow uploads cannot fill the memory either.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Optional

# The API's deepest JSON is a list inside an object (3 levels): 32 leaves room and stops the
# nesting that makes recursive parsers raise RecursionError (Python's json, pydantic's own limit).
MAX_JSON_DEPTH = 32
# Objects, arrays and commas outside strings: the API's largest request (256 labels, 64 images)
# has a few hundred. Bounding them bounds what json.loads builds and what the depth walk visits
# (a 20 MB body of `{},` is 6.7M objects: 11 s of the event loop and 1 GB, for a 422).
MAX_JSON_VALUES = 50_000
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class BodyRejected(Exception):
    """The body cannot be taken: answered with `status` and our error body."""

    def __init__(self, status: int, kind: str, detail: str, close: bool = True):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.close = status, kind, detail, close


class ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


class UploadBudget:
    """Bytes held by bodies still arriving, process-wide (one front worker = one event loop)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, n: int) -> None:
        if self.held + n > self.max_bytes:
            raise BodyRejected(503, "overloaded", "too many request bodies arriving at once; retry shortly", close=True)
        self.held += n

    def give_back(self, n: int) -> None:
        self.held -= n


async def read_body(receive, *, content_length: Optional[str], cap: int, timeout_s: float,
                    budget: UploadBudget) -> bytes:
    """The whole body within `timeout_s`, at most `cap` bytes (also without Content-Length)."""
    if content_length is not None and (not content_length.isdigit() or int(content_length) > cap):
        raise BodyRejected(413, "body_too_large", f"request body over {cap} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = msg.get("body", b"")
                if total + len(chunk) > cap:
                    raise BodyRejected(413, "body_too_large", f"request body over {cap} bytes")
                budget.take(len(chunk))
                total += len(chunk)
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        raise BodyRejected(408, "body_timeout", f"request body not received within {timeout_s:g} s") from None
    finally:
        budget.give_back(total)
    body = b"".join(chunks)
    del chunks  # one copy of the body per request, not two (memory under bursts of large uploads)
    return body


def _structure(body: bytes) -> int:
    return body.count(b"{") + body.count(b"[") + body.count(b",")


def too_many_values(body: bytes) -> bool:
    """More than MAX_JSON_VALUES objects, arrays and commas outside strings, counted before
    parsing at C speed: bytes first (13 ms per 20 MB), then, only when those are over because
    brackets and commas sit inside strings (labels, templates), with the strings cut out; a body of
    so many strings that cutting them out would itself take long is over as it is."""
    if len(body) <= MAX_JSON_VALUES or _structure(body) <= MAX_JSON_VALUES:  # a short body cannot be over
        return False
    return body.count(b'"') > 2 * MAX_JSON_VALUES or _structure(_JSON_STRING.sub(b"", body)) > MAX_JSON_VALUES


def loads_strict(data: bytes | str) -> Any:
    """`json.loads` as pydantic (BentoML's route) reads JSON: UTF-8 only (no byte-order mark, no
    UTF-16/32, which `json.loads(bytes)` would guess), so both routes answer a body alike. Raises
    ValueError. Lone surrogate escapes ("\\ud800") are found by `lone_surrogate`."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if text.startswith("\ufeff"):
        raise ValueError("a byte-order mark before the JSON")
    return json.loads(text)


def lone_surrogate(s: str) -> bool:
    """A string holding half of a UTF-16 pair (from a "\\udXXX" escape): not text pydantic accepts."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_problem(body: bytes) -> Optional[str]:
    """Why `body` is not a JSON object we accept, or None. The parsed value is not kept (BentoML
    parses it again); its size is bounded before parsing, its depth measured without recursion."""
    if too_many_values(body):
        return f"request body has more than {MAX_JSON_VALUES} JSON values (objects, arrays, list items)"
    try:
        value = loads_strict(body or b"{}")
    except RecursionError:
        return f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError as err:  # UnicodeDecodeError included
        detail = "it is not UTF-8" if isinstance(err, UnicodeDecodeError) or "byte-order" in str(err) else ""
        return "request body is not valid JSON" + (f" ({detail})" if detail else "")
    if not isinstance(value, dict):
        return "request body must be a JSON object"
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"request body is nested deeper than {MAX_JSON_DEPTH} levels"
        children = list(node.values()) + list(node) if isinstance(node, dict) else node if isinstance(node, list) else ()
        for c in children:
            if isinstance(c, (dict, list)):
                stack.append((c, depth + 1))
            elif isinstance(c, str) and lone_surrogate(c):
                return "request body is not valid JSON (a lone UTF-16 surrogate escape)"
    return None
