"""`POST /classify` answered in the guard, without BentoML's request path (the hot endpoint).

For a 1-image request on the packaged tiny bundle, BentoML's path around our route code -- its
metrics, OpenTelemetry and access-log middlewares, Starlette's Request, the form parser writing
each upload to a temp file, pydantic validation of the input model, the answer's serialisation --
cost the front more CPU than decoding the image and the model pass together
(bench/serving/results/README.md). The guard (guard.py) already has the whole body in memory and
has done every check that precedes BentoML (auth, body deadline and caps, in-flight limit, JSON
depth, no URLs for files); here the fields are read strictly (form.py) and the same endpoint body
(`routes.classify` through `Front.answer`: readiness, decoding budgets and lanes, the encoder hop,
our metrics, every error kind) runs directly; the JSON answer is written by us. A body the strict
reader is not sure of goes to BentoML's route as before, so odd input keeps its old answer.

Where: BentoML puts its own middlewares (metrics, tracing, access log, timeout, concurrency) outside
every middleware a service adds, so `FastEntrance` is installed outermost (bento_speed.py
`install_outermost`) and takes `POST /classify` straight to the guard; every other request goes
down BentoML's stack unchanged, to the same guard instance (one `Lane` joins the two: one set of
in-flight/upload counters). The guard's own checks and limits (408, 413, 429, 504, ...) apply as
before; BentoML's backstop timeout/concurrency middlewares and its request metrics do not see
/classify (ours, `clipheads_requests_total`, count it), and the access line BentoML would write
is written here in BentoML's format when its access log is on.

`CLIPHEADS_FAST_CLASSIFY=0` sends /classify down BentoML's stack and route as before (A/B and the
parity test, tests/test_serving_fast.py). The front service binds itself (`Lane.bind`) when its
worker creates it; until then (or with no front in the process, e.g. in-process tests of the
guard) /classify takes BentoML's path.
"""
from __future__ import annotations

import json
import logging
from time import perf_counter
from typing import Any, Optional

from . import routes
from .core import Front
from .form import ClassifyFields, json_fields, multipart_fields

FAST_PATH = "/classify"


class Lane:
    """Joins the outermost entrance, the guard and the front service instance of one process."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.guard: Any = None  # the GuardMiddleware instance (it registers itself)
        self.front: Optional[Front] = None  # the service instance, once BentoML created it

    def bind(self, front: Front) -> None:
        self.front = front

    def takes(self, scope: dict) -> bool:
        return self.enabled and self.front is not None and scope.get("path") == FAST_PATH \
            and scope.get("method") == "POST"


def _access_options() -> Optional[dict]:
    """BentoML's access-log settings, or None when its access log is off."""
    try:
        from bentoml._internal.container import BentoMLContainer

        cfg = BentoMLContainer.api_server_config.logging.access
        if not cfg.enabled.get():
            return None
        return {"req_type": cfg.request_content_type.get(), "req_len": cfg.request_content_length.get(),
                "resp_type": cfg.response_content_type.get(), "resp_len": cfg.response_content_length.get()}
    except Exception:  # noqa: BLE001 - no BentoML configuration (in-process use): no access log
        return None


class FastEntrance:
    """Outermost ASGI middleware: `POST /classify` to the guard directly (module docstring)."""

    def __init__(self, app, lane: Lane) -> None:
        self.app = app
        self.lane = lane
        self._access: Optional[dict] = None
        self._log = logging.getLogger("bentoml.access")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.lane.guard is None or not self.lane.takes(scope):
            return await self.app(scope, receive, send)
        if self._access is None:
            self._access = _access_options() or {}
        if not self._access or not self._log.isEnabledFor(logging.INFO):
            return await self.lane.guard(scope, receive, send)
        t0, seen = perf_counter(), {}

        async def noting(msg):
            if msg["type"] == "http.response.start":
                seen["status"] = msg["status"]
                seen["headers"] = msg.get("headers", [])
            await send(msg)

        try:
            await self.lane.guard(scope, receive, noting)
        finally:
            self._write_access(scope, seen, perf_counter() - t0)

    def _write_access(self, scope, seen: dict, seconds: float) -> None:
        """One line in BentoML's access-log format (bentoml/_internal/server/http/access.py)."""
        a = self._access
        client = scope.get("client")
        hdrs = dict(scope.get("headers", []))
        out = dict(seen.get("headers", []))
        req = [f"scheme={scope.get('scheme', 'http')}", f"method={scope['method']}", f"path={scope['path']}"]
        if a["req_type"]:
            req.append(f"type={hdrs.get(b'content-type', b'').decode('latin-1')}")
        if a["req_len"]:
            req.append(f"length={hdrs.get(b'content-length', b'').decode('latin-1')}")
        resp = [f"status={seen.get('status', 0)}"]
        if a["resp_type"]:
            resp.append(f"type={out.get(b'content-type', b'').decode('latin-1')}")
        if a["resp_len"]:
            resp.append(f"length={out.get(b'content-length', b'').decode('latin-1')}")
        self._log.info("%s (%s) (%s) %.3fms", f"{client[0]}:{client[1]}" if client else "_", ",".join(req),
                       ",".join(resp), seconds * 1000)


class _Response:
    def __init__(self) -> None:
        self.status_code: Optional[int] = None
        self.headers: dict[str, str] = {}


class _Context:
    """What `Front.answer` / `Front.error` use of `bentoml.Context`: the response's status and headers."""

    def __init__(self) -> None:
        self.response = _Response()


def read_fields(ctype: str, content_type: str, body: bytes, max_images: int) -> Optional[ClassifyFields]:
    if ctype == "application/json":
        return json_fields(body)
    return multipart_fields(body, content_type, max_images)


async def classify(front: Front, fields: ClassifyFields, send) -> None:
    """Answer one /classify with the endpoint body BentoML's route runs (service.py)."""
    ctx = _Context()
    out = await front.answer(ctx, "classify", lambda: routes.classify(
        front, fields.images, fields.images_b64, fields.tasks, fields.top_k))
    body = json.dumps(out, separators=(",", ":")).encode()
    status = ctx.response.status_code or 200
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in ctx.response.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
