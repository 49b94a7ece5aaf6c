"""The HTTP service: a light front (`ClipHeads`) and a batchable encoder (`Encoder`), BentoML 1.4.

    client --HTTP--> GuardMiddleware --> ClipHeads (decode, validate, route tasks, few-shot,
                                         zero-shot label cache, response shaping)
                                           | bentoml.depends (local unix socket)
                                           v
                                         Encoder (Runtime: ORT / torch; continuous batching)

Start it with `clipheads serve BUNDLE|HEAD` (serving/cli.py) or
`CLIPHEADS_SOURCE=... bentoml serve clipheads.serving.service:ClipHeads`. Everything is configured from
environment variables (`ServeConfig`), read once at import because BentoML's service decorators
take their limits at class-definition time.

Input safety lives in `GuardMiddleware` (before BentoML parses anything) and in the handlers:
bearer auth, content-type allow-list (pickle/octet-stream -> 415), body byte cap while streaming
(413, also without Content-Length), no URL strings where files are expected, concurrency limit
(fast 429 + Retry-After), request timeout (504), and every error body is
`{"error": kind, "detail": text}` -- BentoML's own 4xx/5xx bodies for unparseable input are
rewritten into that shape (as 400), so bad input never yields a 500.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

import bentoml
from bentoml.exceptions import ServiceUnavailable
import numpy as np

from .drain import FrontRegistry, chain_exit_signals, pin_dependency
from .heads import HeadIncompatible, HeadLoadError, HeadSlot, load_head
from . import metric_labels
from .decode_budget import DecodeBudget, DecodeLanes
from .images import DEFAULT_MAX_PIXELS, DecodeSpec, ImageRejected
from .templates import check_templates
from .runtime import Runtime, softmax
from .tasks_store import LRUCache, TaskStore, TaskStoreError, check_name, open_task_store

log = logging.getLogger("clipheads.serving")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


@dataclass(frozen=True)
class ServeConfig:
    """All knobs, from `CLIPHEADS_*` environment variables (defaults in parentheses)."""

    source: str = ""  # CLIPHEADS_SOURCE: bundle dir or *.head.safetensors (required)
    runtime: str = "auto"  # CLIPHEADS_RUNTIME: auto|onnx|onnx-cpu|onnx-cuda|torch|tensorrt
    # CLIPHEADS_TASKS_STORE (or CLIPHEADS_TASKS_DIR): few-shot tasks in a directory or a postgresql:// URL ("" = memory)
    tasks_store: str = field(default="", repr=False)
    max_body_bytes: int = 20 * 1024 * 1024  # CLIPHEADS_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS  # CLIPHEADS_MAX_PIXELS (per image, from the header)
    max_request_pixels: int = DecodeBudget.request_pixels  # CLIPHEADS_MAX_REQUEST_PIXELS: decode pixels per request
    max_decode_pixels: int = DecodeBudget.process_pixels  # CLIPHEADS_MAX_DECODE_PIXELS: large-image pixels decoding at once
    large_image_pixels: int = DecodeBudget.large_pixels  # CLIPHEADS_LARGE_IMAGE_PIXELS: above it, the large lane
    max_images: int = 32  # CLIPHEADS_MAX_IMAGES per request
    max_examples: int = 64  # CLIPHEADS_MAX_EXAMPLES per POST /tasks
    max_labels: int = 256  # CLIPHEADS_MAX_LABELS per request
    max_label_chars: int = 100  # CLIPHEADS_MAX_LABEL_CHARS
    max_templates: int = 16  # CLIPHEADS_MAX_TEMPLATES
    max_concurrency: int = 64  # CLIPHEADS_MAX_CONCURRENCY in-flight API requests, then 429
    timeout_s: int = 30  # CLIPHEADS_TIMEOUT_S per request, then 504
    max_batch_size: int = 64  # CLIPHEADS_MAX_BATCH_SIZE images per encoder pass
    batch_wait_ms: int = 0  # CLIPHEADS_BATCH_WAIT_MS extra wait for more images before a pass (GPU: 2-5)
    decode_threads: int = 2  # CLIPHEADS_DECODE_THREADS
    grace_s: int = 30  # CLIPHEADS_GRACE_S: after SIGTERM, how long in-flight requests get to finish
    allow_reload: bool = False  # CLIPHEADS_ALLOW_RELOAD=1: POST /admin/reload (needs an auth token)
    reload_root: str = ""  # CLIPHEADS_RELOAD_ROOT: reload paths must lie inside (default: the source's folder)
    auth_token: str = field(default="", repr=False)  # CLIPHEADS_AUTH_TOKEN: bearer token; "" = no auth

    @property
    def admin_enabled(self) -> bool:
        """Admin routes exist only when asked for and protected by a token (B5 #20)."""
        return self.allow_reload and bool(self.auth_token)

    @classmethod
    def from_env(cls) -> "ServeConfig":
        e = os.environ.get
        d = cls()
        return cls(
            source=e("CLIPHEADS_SOURCE", ""),
            runtime=e("CLIPHEADS_RUNTIME", "auto") or "auto",
            tasks_store=e("CLIPHEADS_TASKS_STORE", "") or e("CLIPHEADS_TASKS_DIR", ""),
            max_body_bytes=_env_int("CLIPHEADS_MAX_BODY_BYTES", d.max_body_bytes),
            max_pixels=_env_int("CLIPHEADS_MAX_PIXELS", d.max_pixels),
            max_request_pixels=_env_int("CLIPHEADS_MAX_REQUEST_PIXELS", d.max_request_pixels),
            max_decode_pixels=_env_int("CLIPHEADS_MAX_DECODE_PIXELS", d.max_decode_pixels),
            large_image_pixels=_env_int("CLIPHEADS_LARGE_IMAGE_PIXELS", d.large_image_pixels),
            max_images=_env_int("CLIPHEADS_MAX_IMAGES", d.max_images),
            max_examples=_env_int("CLIPHEADS_MAX_EXAMPLES", d.max_examples),
            max_labels=_env_int("CLIPHEADS_MAX_LABELS", d.max_labels),
            max_label_chars=_env_int("CLIPHEADS_MAX_LABEL_CHARS", d.max_label_chars),
            max_templates=_env_int("CLIPHEADS_MAX_TEMPLATES", d.max_templates),
            max_concurrency=_env_int("CLIPHEADS_MAX_CONCURRENCY", d.max_concurrency),
            timeout_s=_env_int("CLIPHEADS_TIMEOUT_S", d.timeout_s),
            max_batch_size=_env_int("CLIPHEADS_MAX_BATCH_SIZE", d.max_batch_size),
            batch_wait_ms=_env_int("CLIPHEADS_BATCH_WAIT_MS", d.batch_wait_ms),
            decode_threads=_env_int("CLIPHEADS_DECODE_THREADS", d.decode_threads),
            grace_s=_env_int("CLIPHEADS_GRACE_S", d.grace_s),
            allow_reload=e("CLIPHEADS_ALLOW_RELOAD", "") in ("1", "true", "yes"),
            reload_root=e("CLIPHEADS_RELOAD_ROOT", ""),
            auth_token=e("CLIPHEADS_AUTH_TOKEN", ""),
        )


CONFIG = ServeConfig.from_env()
ENCODER_TIMEOUT_S = max(CONFIG.timeout_s * 2, 60)  # encoder calls; also the admin routes' request timeout

# ---- metrics (exposed on /metrics next to BentoML's own) --------------------------------------
metric_labels.install()  # BentoML's request metrics: one series per route, not per client-sent path
REQUESTS = bentoml.metrics.Counter(
    name="clipheads_requests_total", documentation="API requests by endpoint and status",
    labelnames=["endpoint", "status"],
)
TASK_PREDICTIONS = bentoml.metrics.Counter(
    name="clipheads_task_predictions_total", documentation="Images classified per task", labelnames=["task"],
)
IMAGES = bentoml.metrics.Counter(
    name="clipheads_images_total", documentation="Images encoded per runtime", labelnames=["runtime"],
)
REJECTIONS = bentoml.metrics.Counter(
    name="clipheads_rejections_total", documentation="Rejected requests by error kind", labelnames=["kind"],
)
IN_FLIGHT = bentoml.metrics.Gauge(
    name="clipheads_in_flight", documentation="API requests being processed (admitted by the guard)",
    multiprocess_mode="livesum",
)
ENCODER_BATCH = bentoml.metrics.Histogram(
    name="clipheads_encoder_batch_size", documentation="Images per encoder pass (continuous batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ENCODER_QUEUE = bentoml.metrics.Gauge(
    name="clipheads_encoder_queue_images", documentation="Images waiting for an encoder pass",
    multiprocess_mode="livesum",
)
HEAD_INFO = bentoml.metrics.Gauge(
    name="clipheads_head_info", documentation="1 for the head version being served", labelnames=["version"],
    multiprocess_mode="livemax",
)
HEAD_LOAD_FAILURES = bentoml.metrics.Counter(
    name="clipheads_head_load_failures_total", documentation="Refused head reloads by reason",
    labelnames=["reason"],
)
RUNTIME_ERRORS = bentoml.metrics.Counter(
    name="clipheads_runtime_errors_total", documentation="Unexpected runtime failures", labelnames=["runtime"],
)


class EncoderFailure(RuntimeError):
    """The runtime raised on this request's images (details are in the encoder's log only)."""


class ApiError(Exception):
    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


API_ROUTES = {"/classify", "/zero_shot", "/tasks", "/tasks/list", "/tasks/delete"}
ADMIN_ROUTES = {"/admin/reload"}
OPEN_PATHS = {"/livez", "/readyz", "/healthz", "/metrics"}
_DISPOSITION = re.compile(rb"(?im)^content-disposition:[^\r\n]*")
_NAME_IMAGES = re.compile(rb"""(?i)[;\s]name=("images"|images\b)""")


ERROR_CODES = {
    "400": "invalid_json / invalid_request / invalid_base64", "401": "unauthorized (when a token is set)",
    "404": "not_found / unknown_task", "405": "method_not_allowed",
    "409": "task_exists / task_readonly / incompatible_head",
    "413": "body_too_large / too_many_bytes / too_many_pixels", "415": "unsupported_media_type / unsupported_format",
    "422": "invalid input (image, labels, task, top_k, ...)", "429": "overloaded (Retry-After)",
    "500": "internal (generic body)", "503": "not_ready / overloaded / decode_busy / tasks_store_unavailable (Retry-After)", "504": "timeout",
}


def patch_openapi(doc: dict, admin: bool = False) -> dict:
    """Document our `{"error", "detail"}` bodies and status codes on every API route; admin routes
    only when they are enabled."""
    doc.setdefault("components", {}).setdefault("schemas", {})["ClipheadsError"] = {
        "type": "object", "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    }
    err = {"application/json": {"schema": {"$ref": "#/components/schemas/ClipheadsError"}}}
    if not admin:
        for route in ADMIN_ROUTES:
            doc.get("paths", {}).pop(route, None)
    for route in API_ROUTES | (ADMIN_ROUTES if admin else set()):
        op = doc.get("paths", {}).get(route, {}).get("post")
        if op is None:
            continue
        responses = op.setdefault("responses", {})
        for code, what in ERROR_CODES.items():
            responses[code] = {"description": what, "content": err}
        if route == "/tasks":
            responses["201"] = {"description": "task registered", "content": responses.pop("200")["content"]}
    paths = doc.get("paths", {})
    if "/tasks/list" in paths:
        listing = json.loads(json.dumps(paths["/tasks/list"]["post"]))
        listing.pop("requestBody", None)
        listing["operationId"] = "rest_list_tasks"
        paths["/tasks"] = dict(paths.get("/tasks", {}), get=listing)
    if "/tasks/delete" in paths:
        deleting = json.loads(json.dumps(paths["/tasks/delete"]["post"]))
        deleting.pop("requestBody", None)
        deleting["operationId"] = "rest_delete_task"
        deleting["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
        paths["/tasks/{name}"] = {"delete": deleting}
    return doc


def _json_bytes(status: int, kind: str, detail: str) -> bytes:
    return json.dumps({"error": kind, "detail": detail}).encode()


class GuardMiddleware:
    """Pure ASGI front door: everything here runs before BentoML touches the request."""

    def __init__(self, app, config: ServeConfig = CONFIG):
        self.app = app
        self.cfg = config
        self.in_flight = 0

    async def _reply(self, send, status: int, kind: str, detail: str, headers: Optional[list] = None) -> None:
        REJECTIONS.labels(kind=kind).inc()
        body = _json_bytes(status, kind, detail)
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"x-clipheads", b"1")]
        await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if path == "/docs.json" and method == "GET":
            return await self._docs(scope, receive, send)
        if path.startswith("/admin") and not self.cfg.admin_enabled:
            return await self._reply(send, 404, "not_found", f"{path[:100]} does not exist")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.cfg.auth_token:
            got = headers.get("authorization", "")
            want = f"Bearer {self.cfg.auth_token}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                return await self._reply(send, 401, "unauthorized", "missing or wrong bearer token",
                                         [(b"www-authenticate", b"Bearer")])
        # REST aliases BentoML cannot route itself (its APIs are POST and have no path parameters).
        body_override: Optional[bytes] = None
        if method == "GET" and path in ("/tasks", "/tasks/"):
            path, method, body_override = "/tasks/list", "POST", b"{}"
        elif method == "DELETE" and path.startswith("/tasks/"):
            raw = scope.get("raw_path") or path.encode()
            name = unquote(raw.decode("latin-1")[len("/tasks/"):])
            path, method, body_override = "/tasks/delete", "POST", json.dumps({"name": name}).encode()
        if path not in API_ROUTES and path not in ADMIN_ROUTES:
            return await self.app(scope, receive, send)  # docs, schema, UI, 404s: BentoML's business
        if method != "POST":
            return await self._reply(send, 405, "method_not_allowed", f"{method} {path} is not supported")
        if body_override is not None:
            scope = dict(scope, path=path, raw_path=path.encode(), method="POST",
                         headers=[(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body_override)).encode())]
                         + [(k, v) for k, v in scope.get("headers", [])
                            if k.lower() not in (b"content-type", b"content-length")])
            ctype = "application/json"
        else:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in ("multipart/form-data", "application/json"):
                return await self._reply(
                    send, 415, "unsupported_media_type",
                    f"content type {ctype or '(none)'!r} is not accepted; use multipart/form-data or application/json",
                )
        if self.in_flight >= self.cfg.max_concurrency:
            return await self._reply(send, 429, "overloaded", "too many concurrent requests; retry shortly",
                                     [(b"retry-after", b"1")])
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            timeout = ENCODER_TIMEOUT_S if path in ADMIN_ROUTES else self.cfg.timeout_s
            await self._guarded(scope, receive, send, path, ctype, headers, body_override, timeout)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()

    async def _docs(self, scope, receive, send):
        """BentoML's OpenAPI document, made true to what this service answers: our error body
        and status codes on every API route, 201 for POST /tasks, and the REST aliases."""
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                body = json.dumps(patch_openapi(json.loads(body), self.cfg.admin_enabled)).encode()
            except (ValueError, KeyError, TypeError, AttributeError):
                log.exception("could not patch the OpenAPI document; serving BentoML's")
        hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": hdrs + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _guarded(self, scope, receive, send, path, ctype, headers, body_override, timeout):
        cap = self.cfg.max_body_bytes
        if body_override is not None:
            body = body_override
        else:
            clen = headers.get("content-length")
            if clen is not None and (not clen.isdigit() or int(clen) > cap):
                return await self._reply(send, 413, "body_too_large", f"request body over {cap} bytes",
                                         [(b"connection", b"close")])
            chunks, total = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                total += len(chunk)
                if total > cap:
                    return await self._reply(send, 413, "body_too_large", f"request body over {cap} bytes",
                                             [(b"connection", b"close")])
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            del chunks  # one copy of the body per request, not two (memory under bursts of large uploads)
        if ctype == "application/json":
            try:
                is_object = isinstance(json.loads(body or b"{}"), dict)  # not kept: the app parses it again
            except (ValueError, UnicodeDecodeError):
                return await self._reply(send, 400, "invalid_json", "request body is not valid JSON")
            if not is_object:
                return await self._reply(send, 400, "invalid_json", "request body must be a JSON object")
        else:
            for m in _DISPOSITION.finditer(body):
                line = m.group(0)
                if _NAME_IMAGES.search(line) and b"filename" not in line.lower():
                    return await self._reply(
                        send, 422, "url_not_allowed",
                        "'images' fields must be uploaded files; URLs and strings are not fetched",
                    )

        pending = [body]  # handed to the app once and dropped here: the app holds the only copy
        del body

        async def replay():
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()

        state = {"started": False, "rewrite": False, "status": 200, "headers": [], "buf": []}

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status = msg["status"]
                hdrs = msg.get("headers", [])
                ours = any(k.lower() == b"x-clipheads" for k, _ in hdrs)
                state["status"] = status
                if status >= 400 and not ours:
                    state["rewrite"] = True  # BentoML's own error (input parsing): reshape it
                    return
                state["started"] = True
                return await send(msg)
            if msg["type"] == "http.response.body" and state["rewrite"]:
                state["buf"].append(msg.get("body", b""))
                if msg.get("more_body", False):
                    return
                raw = b"".join(state["buf"])
                try:
                    parsed = json.loads(raw)
                    if isinstance(parsed, list) and parsed:
                        parsed = parsed[0]
                    detail = parsed.get("error", "") if isinstance(parsed, dict) else str(parsed)
                    extra = parsed.get("detail") if isinstance(parsed, dict) else None
                    if extra:
                        detail = f"{detail}: " + "; ".join(
                            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
                            for e in extra if isinstance(e, dict)) if isinstance(extra, list) else f"{detail}: {extra}"
                except (ValueError, UnicodeDecodeError, AttributeError):
                    detail = raw[:200].decode("utf-8", "replace")
                status = state["status"]
                if status >= 500 and status not in (503, 504):
                    status, kind, detail = 400, "invalid_request", "malformed request (could not be parsed)"
                elif status == 503:
                    kind = "overloaded"
                elif status == 504:
                    kind = "timeout"
                elif status == 404:
                    kind = "not_found"
                else:
                    status, kind = (status if status in (401, 403, 405, 413, 415, 422, 429) else 400), "invalid_request"
                state["started"] = True
                return await self._reply(send, status, kind, detail[:1000])
            return await send(msg)

        try:
            await asyncio.wait_for(self.app(scope, replay, send_wrapper), timeout=timeout)
        except asyncio.TimeoutError:
            if not state["started"]:
                await self._reply(send, 504, "timeout", f"not processed within {timeout} s")


# ---- the encoder service ----------------------------------------------------------------------
@bentoml.service(
    name="clipheads_encoder",
    workers=1,
    threads=1,  # the runtime itself uses the cores (ORT intra-op / torch threads)
    traffic={"timeout": ENCODER_TIMEOUT_S},
    # BentoML renews its client session to a dependency every 100 requests by closing the old one,
    # which cuts the requests still in flight on it (aiohttp ServerDisconnected). A local socket
    # needs no renewal: one session for the life of the front.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class Encoder:
    """Holds the Runtime. Internal only: reached from ClipHeads over a local unix socket."""

    def __init__(self) -> None:
        from .model_store import resolve_source

        if not CONFIG.source:
            raise RuntimeError("set CLIPHEADS_SOURCE to a bundle directory, a *.head.safetensors file or a model tag")
        # The front (HTTP, decode) shares the cores with ORT: idle intra-op threads must sleep, not
        # spin (ViT-B/32 on 2 busy cores: 207 -> 115 CPU ms per image at concurrency 1).
        os.environ.setdefault("CLIPHEADS_ORT_SPIN", "0")
        source = resolve_source(CONFIG.source)  # path or store tag
        self._wrap = None
        hook = os.environ.get("CLIPHEADS_RUNTIME_HOOK", "")
        if hook:  # diagnostics / fault-injection tests only: "module:callable", runtime -> runtime
            import importlib

            mod, _, fn = hook.partition(":")
            self._wrap = getattr(importlib.import_module(mod), fn)
            log.warning("runtime wrapped by CLIPHEADS_RUNTIME_HOOK=%s", hook)
        # warmed below: a failing warm-up is reported through readiness, not a crash loop
        self.slot = HeadSlot(load_head(source, CONFIG.runtime, self._wrap, warm=False))
        HEAD_INFO.labels(version=self.slot.current.version).set(1)
        self.error: Optional[str] = None
        self.fronts = FrontRegistry(CONFIG.grace_s)
        import collections

        self._queue: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._runner: Optional[asyncio.Future] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        try:
            self.runtime.warmup()
        except Exception as err:  # noqa: BLE001 - reported through readiness, not a crash loop
            self.error = f"{type(err).__name__}: {err}"
            log.exception("runtime warm-up failed")
        log.info("encoder ready: %s on %s (head version %s)", self.runtime.name, CONFIG.source, self.slot.current.version)

    @property
    def runtime(self) -> Runtime:
        return self.slot.current.runtime

    @bentoml.api
    async def encode(self, jobs: list[Any], deadline: float = 0.0) -> list[Any]:
        """jobs: one per image of ONE request, {"paths": [int], "pixels": (3, S, S) uint8} ->
        per image {"logits": {path: (C_path,)}, "features": {path: (E,)}} or {"error": kind}.
        `deadline` (epoch seconds, 0 = none): the front has given up after it; the pass skips it.

        Continuous batching (instead of BentoML's adaptive batching, whose latency model sheds
        queued requests with 503s when one pass takes seconds on a CPU): requests queue here; one
        runner thread takes everything queued (up to CLIPHEADS_MAX_BATCH_SIZE images) as soon as
        the previous pass ends, so the batch grows with the load and an idle server adds no wait.
        One runtime pass per distinct path; if it raises, each image is retried alone, so a failure
        fails only the request(s) that cause it."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((jobs, float(deadline or 0.0), fut))
        ENCODER_QUEUE.inc(len(jobs))
        self._wake.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run_batches())
        return await fut

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        cap = max(1, CONFIG.max_batch_size)
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if CONFIG.batch_wait_ms > 0 and sum(len(q[0]) for q in self._queue) < cap:
                await asyncio.sleep(CONFIG.batch_wait_ms / 1000)
            take, n, now = [], 0, time.time()
            while self._queue and (n == 0 or n + len(self._queue[0][0]) <= cap):
                jobs, deadline, fut = self._queue.popleft()
                ENCODER_QUEUE.dec(len(jobs))
                if fut.done():
                    continue
                if deadline and now > deadline:  # the front already answered 504: skip the work
                    fut.set_result([{"error": "timeout"}] * len(jobs))
                    continue
                take.append((jobs, fut))
                n += len(jobs)
            if not take:
                continue
            flat = [j for jobs, _ in take for j in jobs]
            ENCODER_BATCH.observe(len(flat))
            head = self.slot.current  # one version for the whole pass (a swap lands between passes)
            try:
                res = await loop.run_in_executor(self._pool, self._encode_isolated, head.runtime, flat)
            except Exception:  # noqa: BLE001 - never let the runner die
                log.exception("encoder pass failed")
                res = [{"error": "internal"}] * len(flat)
            for r in res:
                r.setdefault("version", head.version)
            i = 0
            for jobs, fut in take:
                if not fut.done():
                    fut.set_result(res[i:i + len(jobs)])
                i += len(jobs)

    def _encode_isolated(self, runtime: Runtime, jobs: list[Any]) -> list[Any]:
        try:
            return self._encode_batch(runtime, jobs)
        except Exception:  # noqa: BLE001 - isolate: find the failing image(s)
            if len(jobs) == 1:
                log.exception("runtime failure")
                return [{"error": "internal"}]
            log.warning("batched pass over %d images failed; retrying them one by one", len(jobs))
            out: list[Any] = []
            for job in jobs:
                try:
                    out.extend(self._encode_batch(runtime, [job]))
                except Exception:  # noqa: BLE001
                    log.exception("runtime failure")
                    out.append({"error": "internal"})
            return out

    def _encode_batch(self, runtime: Runtime, jobs: list[Any]) -> list[Any]:
        out: list[Any] = [{"logits": {}, "features": {}} for _ in jobs]
        by_path: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            for p in job["paths"]:
                by_path.setdefault(int(p), []).append(i)
        for p, idx in by_path.items():
            pixels = np.stack([jobs[i]["pixels"] for i in idx])
            logits, feats = runtime.run_path(p, pixels)
            if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
                raise FloatingPointError(f"non-finite outputs on path {p}")
            for j, i in enumerate(idx):
                out[i]["logits"][p] = logits[j]
                out[i]["features"][p] = feats[j]
        return out

    @bentoml.api
    async def ping(self, front_pid: int = 0) -> dict:
        """Cheap liveness of this process for the front's /readyz (pid changes on a restart).
        A front pings with its pid once warm: on SIGTERM this encoder outlives those fronts."""
        self.fronts.register(int(front_pid))
        return {"pid": os.getpid(), "error": self.error}

    @bentoml.on_startup
    def _defer_exit_to_fronts(self) -> None:
        chain_exit_signals(self.fronts.on_exit_signal)

    @bentoml.on_shutdown
    def _stop_runner(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=False)

    @bentoml.api
    def encode_texts(self, texts: list[str]) -> dict:
        head = self.slot.current
        return {"weights": head.runtime.encode_texts(texts), "version": head.version}

    @bentoml.api
    def info(self) -> dict:
        head = self.slot.current
        rt = head.runtime
        d = rt.describe()
        d.update(preprocess=rt.preprocess, base_path=rt.base_path, logit_scale=rt.logit_scale, error=self.error,
                 slices={t.name: list(t.logit_slice) for t in rt.tasks.values()}, version=head.version)
        return d

    @bentoml.api
    async def reload(self, source: str) -> dict:
        """Load, warm up and check `source` beside the serving head, then swap (serving/heads.py).
        The serving head keeps answering meanwhile and stays if anything fails."""
        loop = asyncio.get_running_loop()
        try:
            old, new = await loop.run_in_executor(None, self.slot.swap, source, CONFIG.runtime, self._wrap)
        except (HeadLoadError, HeadIncompatible) as err:
            reason = "incompatible_head" if isinstance(err, HeadIncompatible) else "head_load_failed"
            HEAD_LOAD_FAILURES.labels(reason=reason).inc()
            log.warning("reload of %s refused: %s", source, err)
            return {"error": reason, "detail": str(err)[:1000]}
        HEAD_INFO.labels(version=old.version).set(0)
        HEAD_INFO.labels(version=new.version).set(1)
        self.error = None
        return {"version": new.version, "previous": old.version}

    @bentoml.api
    def check(self) -> dict:
        """Re-run the warm-up pass (readiness probe of the runtime)."""
        try:
            self.runtime.warmup()
            self.error = None
        except Exception as err:  # noqa: BLE001
            self.error = f"{type(err).__name__}: {err}"
        return {"ok": self.error is None, "error": self.error}

    def __is_ready__(self) -> bool:
        return self.error is None


# ---- the front service ------------------------------------------------------------------------
@bentoml.service(
    name="clipheads",
    http={"host": os.environ.get("CLIPHEADS_HOST", "127.0.0.1")},
    # BentoML's own limits are backstops; GuardMiddleware answers first with JSON bodies.
    traffic={"timeout": CONFIG.timeout_s + 5, "max_concurrency": CONFIG.max_concurrency * 2},
)
class ClipHeads:
    encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        self.cfg = CONFIG
        # one image at the per-image cap must always fit the process budget
        self.lanes = DecodeLanes(DecodeBudget(CONFIG.max_request_pixels, max(CONFIG.max_decode_pixels, CONFIG.max_pixels),
                                              CONFIG.large_image_pixels), small_threads=CONFIG.decode_threads)
        self.text_cache = LRUCache(256)
        self.ready = False
        self.info: Optional[dict] = None
        self.spec: Optional[DecodeSpec] = None
        self.store: Optional[TaskStore] = None
        self.failures = 0
        self.draining = False
        self.encoder_pid: Optional[int] = None
        self.head_version: str = ""  # the version of the last result from the encoder
        self._warm_lock = asyncio.Lock()
        self._warm_task: Optional[asyncio.Future] = None
        if self.cfg.allow_reload and not self.cfg.auth_token:
            log.warning("CLIPHEADS_ALLOW_RELOAD ignored: admin routes need CLIPHEADS_AUTH_TOKEN")
        # the encoder client, through a link to its socket that outlives BentoML's shutdown (drain.py)
        self.enc, self._enc_link = pin_dependency(self, "encoder", Encoder)

    # ---- readiness ---------------------------------------------------------------------------
    async def _warm(self) -> bool:
        async with self._warm_lock:
            try:
                if self.info is None:
                    info = await asyncio.wait_for(self.enc.to_async.info(), 30.0)
                    if info.get("error"):
                        raise RuntimeError(info["error"])
                    self.spec = DecodeSpec.from_preprocess(
                        info["preprocess"], max_bytes=self.cfg.max_body_bytes, max_pixels=self.cfg.max_pixels
                    )
                    self.store = open_task_store(self.cfg.tasks_store, identity=info["identity"])
                    log.info("few-shot tasks: %s", self.store.describe())
                    self.info = info
                    self.head_version = info.get("version", "")
                ping = await asyncio.wait_for(self.enc.to_async.ping(front_pid=os.getpid()), 2.0)
                if ping.get("error"):
                    raise RuntimeError(ping["error"])
                s = int(self.info["image_size"])
                px = np.full((1, 3, s, s), 127, np.uint8)
                await self._encode(px, list(range(len(self.info["paths"]))), count=False)
                if self.info.get("has_text", True):
                    await self.enc.to_async.encode_texts(["a photo of a thing."])
                self.encoder_pid = ping["pid"]
                self.ready, self.failures = True, 0
            except Exception as err:  # noqa: BLE001
                log.warning("not ready: %s: %s", type(err).__name__, err)
                self.ready = False
        return self.ready

    async def __is_ready__(self) -> bool:
        """200 only when warmed up, not draining, and the encoder process answers a cheap async
        ping (not queued behind model passes) within 1 s. A dead or restarted encoder (new pid)
        turns this 503 at once and starts a background re-warm; probes never wait for it."""
        if self.draining:
            return False
        if self.ready and self.failures < 3:
            try:
                ping = await asyncio.wait_for(self._call_encoder("ping"), 1.0)
            except Exception as err:  # noqa: BLE001 - dead/restarting encoder, socket gone, timeout
                log.warning("encoder not answering: %s: %s", type(err).__name__, err)
                ping = None
            if ping is not None and ping.get("pid") == self.encoder_pid and not ping.get("error"):
                return True
            self.ready = False
        if self._warm_task is None or self._warm_task.done():
            self._warm_task = asyncio.ensure_future(self._warm())
        return False

    @bentoml.on_startup
    def _install_drain_handler(self) -> None:
        """SIGTERM/SIGINT: flip /readyz to 503 at once, then let uvicorn drain in-flight requests."""

        def on_signal(signum, prev):
            self.draining = True
            prev(signum, None)

        chain_exit_signals(on_signal)

    @bentoml.on_startup
    async def _open_encoder_client(self) -> None:
        if self._enc_link is not None:  # our own client: set up its endpoints as BentoML does for its own
            await self.enc.__aenter__()

    @bentoml.on_shutdown
    async def _close_encoder_client(self) -> None:
        if self._enc_link is not None:
            await self.enc.close()
            self._enc_link.remove()

    # ---- helpers -----------------------------------------------------------------------------
    def _error(self, ctx: bentoml.Context, endpoint: str, err: ApiError) -> dict:
        ctx.response.status_code = err.status
        ctx.response.headers["x-clipheads"] = "1"
        if err.status in (429, 503):
            ctx.response.headers["retry-after"] = "1"
        REJECTIONS.labels(kind=err.kind).inc()
        REQUESTS.labels(endpoint=endpoint, status=str(err.status)).inc()
        return {"error": err.kind, "detail": err.detail}

    async def _run(self, ctx: bentoml.Context, endpoint: str, fn) -> dict:
        if not self.ready:  # never wait for a (re)load inside a request: fast 503, warm behind it
            if self._warm_task is None or self._warm_task.done():
                self._warm_task = asyncio.ensure_future(self._warm())
            return self._error(ctx, endpoint, ApiError(503, "not_ready", "the model is not loaded yet; retry shortly"))
        try:
            out = await fn()
        except ApiError as err:
            return self._error(ctx, endpoint, err)
        except ImageRejected as err:
            return self._error(ctx, endpoint, ApiError(err.http_status, err.kind, err.detail))
        except TaskStoreError as err:
            return self._error(ctx, endpoint, ApiError(err.http_status, err.kind, err.detail))
        except Exception as err:  # noqa: BLE001 - a runtime failure: generic body, no internals
            if isinstance(err, ServiceUnavailable) or "overloaded" in str(err).lower():
                return self._error(ctx, endpoint, ApiError(503, "overloaded", "encoder queue is full; retry shortly"))
            log.exception("internal error in %s", endpoint)
            RUNTIME_ERRORS.labels(runtime=(self.info or {}).get("runtime", "?")).inc()
            if isinstance(err, EncoderFailure):  # only the runtime's own failures speak to readiness:
                self.failures += 1  # anything a request's content can cause must not flip /readyz
            return self._error(ctx, endpoint, ApiError(500, "internal", "unexpected server error; see the server log"))
        ctx.response.headers["x-clipheads"] = "1"
        REQUESTS.labels(endpoint=endpoint, status=str(ctx.response.status_code or 200)).inc()
        self.failures = 0
        return out

    def _read_images(self, images: list[Path], images_b64: list[str], limit: int) -> list[bytes]:
        n = len(images) + len(images_b64)
        if n == 0:
            raise ApiError(422, "no_images", "send at least one image (multipart 'images' files or JSON 'images_b64')")
        if n > limit:
            raise ApiError(422, "too_many_images", f"{n} images; at most {limit} per request")
        blobs: list[bytes] = []
        cap = self.cfg.max_body_bytes
        for p in images:
            p = Path(p)
            if p.stat().st_size > cap:
                raise ImageRejected("too_many_bytes", f"image over {cap} bytes", 413)
            blobs.append(p.read_bytes())
        for i, s in enumerate(images_b64):
            if not isinstance(s, str) or len(s) > cap * 4 // 3 + 4:
                raise ImageRejected("too_many_bytes", f"image_b64[{i}] over {cap} bytes", 413)
            if s.startswith("data:") and "," in s[:100]:
                s = s.split(",", 1)[1]
            try:
                blobs.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_base64", f"images_b64[{i}] is not valid base64") from None
        return blobs

    async def _decode(self, blobs: list[bytes]) -> np.ndarray:
        """Headers first (caps, per-request and process decode budgets: serving/decode_budget.py),
        then decoding, small and large images in separate lanes."""
        headers = self.lanes.probe(blobs, self.spec)
        with self.lanes.admit(headers):
            results = await asyncio.gather(*(self.lanes.decode(b, h, self.spec) for b, h in zip(blobs, headers)))
        for i, r in enumerate(results):
            if isinstance(r, ImageRejected):
                raise ImageRejected(r.kind, f"image {i}: {r.detail}", r.http_status)
        return np.stack(results)

    def _check_labels(self, labels: Any, what: str = "labels") -> list[str]:
        if not isinstance(labels, list) or not labels:
            raise ApiError(422, "invalid_labels", f"'{what}' must be a non-empty list of strings")
        if len(labels) > self.cfg.max_labels:
            raise ApiError(422, "too_many_labels", f"{len(labels)} labels; at most {self.cfg.max_labels}")
        out = []
        for lab in labels:
            if not isinstance(lab, str) or not lab.strip():
                raise ApiError(422, "invalid_labels", f"'{what}' must be non-empty strings")
            if len(lab) > self.cfg.max_label_chars:
                raise ApiError(422, "label_too_long", f"a label is over {self.cfg.max_label_chars} characters")
            out.append(lab.strip())
        if len(set(out)) != len(out):
            raise ApiError(422, "duplicate_labels", f"'{what}' contains duplicates")
        return out

    def _check_templates(self, templates: Optional[list[str]]) -> tuple[str, ...]:
        problem = check_templates(templates, self.cfg.max_templates)
        if problem:
            raise ApiError(422, problem[0], problem[1])
        return tuple(templates) if templates else ("a photo of a {}.",)

    async def _text_weights(self, labels: list[str], templates: tuple[str, ...], version: str) -> tuple[np.ndarray, str]:
        """(L, E) label embeddings and the head version that computed them (the text tower carries
        a head's learned context): from the cache when `version` computed them before."""
        if not self.info.get("has_text", True):
            raise ApiError(422, "text_unavailable", "this bundle has no text graph: request-time labels and "
                           "few-shot tasks are unavailable; classify with the bundle's tasks")

        cached = self.text_cache.get((version, tuple(labels), templates))
        if cached is not None:
            return cached, version
        texts = [t.format(lab.replace("_", " ")) for lab in labels for t in templates]
        res = await self._call_encoder("encode_texts", texts)
        f = np.asarray(res["weights"], np.float32).reshape(len(labels), len(templates), -1).mean(axis=1)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        self.text_cache.put((res["version"], tuple(labels), templates), f)
        return f, res["version"]

    async def _features_and_text(self, pixels: np.ndarray, labels: list[str], templates: tuple[str, ...]):
        """Base-path image features and label embeddings from ONE head version: recomputed in the
        rare case a swap landed between the two calls."""
        base = self.info["base_path"]
        for _ in range(3):
            enc, version = await self._encode(pixels, [base])
            text, text_version = await self._text_weights(labels, templates, version)
            if text_version == version:
                return enc[base]["features"], text, version
        raise ApiError(503, "head_swapping", "the head was swapped repeatedly during this request; retry")

    async def _call_encoder(self, method: str, *args, **kw):
        """Encoder calls are idempotent (a repeated reload loads the same file again): retry when
        the connection to the encoder's socket was closed under us (aiohttp ServerDisconnected, e.g.
        a pooled connection the encoder closed as idle). Rare since the session is never renewed
        (`runner_connection`); a retried `encode` costs the encoder a second pass."""
        import aiohttp

        for attempt in range(3):
            try:
                return await getattr(self.enc.to_async, method)(*args, **kw)
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise
                log.info("encoder connection dropped; retrying %s", method)
                await asyncio.sleep(0.01 * (attempt + 1))

    async def _encode(self, pixels: np.ndarray, paths: list[int], count: bool = True) -> tuple[dict, str]:
        """One encoder call per request: one job per image (uint8), each naming every path it
        needs, so an image is sent once and encoded once per distinct path. Returns
        ({path: {"logits", "features"}}, head version): a request runs in one pass, one version."""
        jobs = [{"paths": paths, "pixels": px} for px in pixels]
        res = await self._call_encoder("encode", jobs, deadline=time.time() + self.cfg.timeout_s)
        if len(res) != len(jobs) or any("error" in r for r in res):
            if any(r.get("error") == "timeout" for r in res):
                raise ApiError(504, "timeout", f"not processed within {self.cfg.timeout_s} s")
            raise EncoderFailure("the encoder failed on this request")
        versions = {r.get("version", "") for r in res}
        if len(versions) != 1:
            raise EncoderFailure(f"one request came back from several head versions {sorted(versions)}")
        self.head_version = version = versions.pop()
        if count:
            IMAGES.labels(runtime=self.info["runtime"]).inc(len(pixels))
        return {p: {"logits": np.stack([r["logits"][p] for r in res]),
                    "features": np.stack([r["features"][p] for r in res])} for p in paths}, version

    def _top_k(self, top_k: int) -> int:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 1000:
            raise ApiError(422, "invalid_top_k", "top_k must be an integer from 1 to 1000")
        return top_k

    @staticmethod
    def _ranked(probs: np.ndarray, labels: list[str] | tuple[str, ...], k: int) -> list[dict]:
        order = np.argsort(-probs)[:k]
        return [{"label": labels[i], "score": round(float(probs[i]), 6)} for i in order]

    def _all_tasks(self) -> dict[str, dict]:
        return {t["name"]: t for t in self.info["tasks"]}

    # ---- endpoints ---------------------------------------------------------------------------
    @bentoml.api(route="/classify")
    async def classify(
        self,
        ctx: bentoml.Context,
        images: list[Path] = [],  # noqa: B006 - BentoML builds the schema from defaults
        images_b64: list[str] = [],  # noqa: B006
        tasks: Optional[list[str]] = None,
        top_k: int = 5,
    ) -> dict:
        """Classify images with the bundle's tasks and registered few-shot tasks.
        multipart: `images` files, `tasks` JSON list (default: all bundle tasks), `top_k`;
        JSON: {"images_b64": [...], "tasks": [...], "top_k": 5}."""

        async def run():
            k = self._top_k(top_k)
            bundle_tasks = self._all_tasks()
            names = list(tasks) if tasks else list(bundle_tasks)
            if len(names) > 64 or len(set(names)) != len(names):
                raise ApiError(422, "invalid_tasks", "'tasks' must be at most 64 distinct names")
            few = {}
            for n in names:
                if n in bundle_tasks:
                    continue
                ft = self.store.get(n) if isinstance(n, str) and len(n) <= 64 else None
                if ft is None:
                    known = ", ".join(sorted(bundle_tasks) + self.store.names())
                    raise ApiError(422, "unknown_task", f"unknown task {str(n)[:64]!r}; known: {known}")
                few[n] = ft
            blobs = self._read_images(images, images_b64, self.cfg.max_images)
            pixels = await self._decode(blobs)
            paths = sorted({bundle_tasks[n]["path"] for n in names if n in bundle_tasks}
                           | ({self.info["base_path"]} if few else set()))
            enc, version = await self._encode(pixels, paths)
            per_task: dict[str, list[list[dict]]] = {}
            for n in names:
                if n in few:
                    logits = few[n].logits(enc[self.info["base_path"]]["features"], self.info["logit_scale"])
                    labels = few[n].labels
                else:
                    a, b = self.info["slices"][n]
                    logits = enc[bundle_tasks[n]["path"]]["logits"][:, a:b]
                    labels = bundle_tasks[n]["labels"]
                probs = softmax(logits)
                per_task[n] = [self._ranked(p, labels, k) for p in probs]
                TASK_PREDICTIONS.labels(task=n if n in bundle_tasks else "few_shot").inc(len(pixels))
            preds = [{n: per_task[n][i] for n in names} for i in range(len(pixels))]
            return {"predictions": preds, "runtime": self.info["runtime"], "head_version": version}

        return await self._run(ctx, "classify", run)

    @bentoml.api(route="/zero_shot")
    async def zero_shot(
        self,
        ctx: bentoml.Context,
        labels: list[str],
        images: list[Path] = [],  # noqa: B006
        images_b64: list[str] = [],  # noqa: B006
        templates: Optional[list[str]] = None,
        top_k: int = 5,
    ) -> dict:
        """Rank free-text `labels` (JSON list) for each image; `templates` like "a photo of a {}."."""

        async def run():
            k = self._top_k(top_k)
            labs = self._check_labels(labels)
            temps = self._check_templates(templates)
            blobs = self._read_images(images, images_b64, self.cfg.max_images)
            pixels = await self._decode(blobs)
            feats, w, version = await self._features_and_text(pixels, labs, temps)
            probs = softmax(self.info["logit_scale"] * feats @ w.T)
            TASK_PREDICTIONS.labels(task="zero_shot").inc(len(pixels))
            return {"predictions": [self._ranked(p, labs, k) for p in probs], "runtime": self.info["runtime"],
                    "head_version": version}

        return await self._run(ctx, "zero_shot", run)

    @bentoml.api(route="/tasks")
    async def register_task(
        self,
        ctx: bentoml.Context,
        name: str,
        labels: list[str],
        example_labels: list[str],
        images: list[Path] = [],  # noqa: B006
        images_b64: list[str] = [],  # noqa: B006
        templates: Optional[list[str]] = None,
        replace: bool = False,
    ) -> dict:
        """Register a training-free few-shot task: `labels`, example `images` and, per image, its
        label in `example_labels`. Persisted to CLIPHEADS_TASKS_DIR."""

        async def run():
            check_name(name)
            if name in self._all_tasks():
                raise ApiError(409, "task_exists", f"{name!r} is a task of the loaded bundle")
            labs = self._check_labels(labels)
            temps = self._check_templates(templates)
            blobs = self._read_images(images, images_b64, self.cfg.max_examples)
            if not isinstance(example_labels, list) or len(example_labels) != len(blobs):
                raise ApiError(422, "invalid_example_labels", "'example_labels' needs one label per example image")
            index = {l: i for i, l in enumerate(labs)}
            try:
                targets = np.array([index[str(l).strip()] for l in example_labels], np.int64)
            except KeyError as err:
                raise ApiError(422, "invalid_example_labels", f"example label {str(err)[:80]} is not in 'labels'") from None
            missing = [l for l in labs if l not in {labs[t] for t in targets}]
            if missing:
                raise ApiError(422, "missing_examples", f"no example image for label(s) {missing[:5]}")
            pixels = await self._decode(blobs)
            keys, text, version = await self._features_and_text(pixels, labs, temps)
            task = self.store.add(name, labs, keys, targets, text, replace=bool(replace))
            ctx.response.status_code = 201
            return {**task.summary(), "head_version": version}

        out = await self._run(ctx, "register_task", run)
        return out

    @bentoml.api(route="/tasks/list")
    async def list_tasks(self, ctx: bentoml.Context) -> dict:
        """All tasks: the bundle's and the registered few-shot ones (also GET /tasks)."""

        async def run():
            bundle = [{"name": t["name"], "kind": "bundle", "labels": t["labels"]} for t in self.info["tasks"]]
            return {"tasks": bundle + self.store.list(), "runtime": self.info["runtime"],
                    "head_version": self.head_version}

        return await self._run(ctx, "list_tasks", run)

    @bentoml.api(route="/tasks/delete")
    async def delete_task(self, ctx: bentoml.Context, name: str) -> dict:
        """Remove a registered few-shot task (also DELETE /tasks/{name})."""

        async def run():
            if isinstance(name, str) and name in self._all_tasks():
                raise ApiError(409, "task_readonly", f"{name!r} belongs to the loaded bundle and cannot be deleted")
            check_name(name)
            if not self.store.delete(name):
                raise ApiError(404, "unknown_task", f"no registered task {name!r}")
            return {"deleted": name}

        return await self._run(ctx, "delete_task", run)

    @bentoml.api(route="/admin/reload")
    async def reload_head(self, ctx: bentoml.Context, source: str) -> dict:
        """Swap the served head for `source` (a model-store tag, or a path inside the reload root)
        without dropping requests: loaded and warmed up beside the serving head, which stays on any
        failure. 404 unless the server runs with --allow-reload (and a token)."""

        async def run():
            path = self._reload_source(source)
            res = await self._call_encoder("reload", str(path))
            if "error" in res:
                raise ApiError(409 if res["error"] == "incompatible_head" else 422, res["error"], res["detail"])
            self.head_version = res["version"]
            return {"head_version": res["version"], "previous": res["previous"]}

        return await self._run(ctx, "reload", run)

    def _reload_source(self, source: Any) -> Path:
        """A model-store tag, or an existing path inside the reload root (after resolving symlinks)."""
        from .model_store import ModelStoreError, resolve_source

        if not isinstance(source, str) or not source.strip() or len(source) > 512 or "\x00" in source:
            raise ApiError(422, "invalid_source", "'source' is a model tag or a path (at most 512 characters)")
        given = Path(source).expanduser()
        if given.exists():  # as in resolve_source: an existing path wins over a tag
            served = Path(self.cfg.source)  # a path, or a model-store tag (then only --reload-root allows paths)
            if not self.cfg.reload_root and not served.exists():
                raise ApiError(422, "source_not_allowed", "reloading from a path needs --reload-root; or give a model tag")
            root = Path(self.cfg.reload_root or served.resolve().parent).resolve()
            if not given.resolve().is_relative_to(root):
                raise ApiError(422, "source_not_allowed", f"reload paths must lie inside {root}")
            return given.resolve()
        try:
            return resolve_source(source)
        except ModelStoreError as err:
            raise ApiError(422, "unknown_source", str(err)[:300]) from None


ClipHeads.add_asgi_middleware(GuardMiddleware, config=CONFIG)
