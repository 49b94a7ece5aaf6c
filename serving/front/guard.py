"""`GuardMiddleware`: the pure-ASGI front door; everything here runs before BentoML parses a request.

Order of checks on an API route: bearer auth (scheme case-insensitive, one Authorization header),
the REST aliases BentoML cannot route (`GET /tasks`, `DELETE /tasks/{name}`), method, content-type
allow-list (pickle/octet-stream -> 415), then the body: read under its own deadline (408) and byte
caps (413, also without Content-Length; 503 when the process holds too many arriving bytes), with a
separate limit on connections still uploading (body.py). Only then does the request count in
flight (fast 429 + Retry-After over the limit), so slow uploads never hold the door for complete
requests. JSON shape (object, depth), no URL strings where files are expected, then BentoML runs
under the request timeout (504). Whatever BentoML or Starlette answer themselves with an error
status, on any path, is reshaped into `{"error", "detail"}` (reshape.py).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Optional
from urllib.parse import unquote

from ..metrics import IN_FLIGHT, REJECTIONS
from . import fast
from .form import multipart_truncated
from .body import BodyRejected, ClientGone, UploadBudget, json_problem, read_body
from .config import ADMIN_ROUTES, API_ROUTES, CONFIG, OPEN_PATHS, ServeConfig
from .errors import error_body
from .openapi import patch_openapi
from .reshape import OURS, Reshaper, classify_api_error, classify_other_error

log = logging.getLogger("clipheads.serving")

_DISPOSITION_KEY = b"content-disposition:"
_WINDOW = 1 << 20
_LINE_END = re.compile(rb"[\r\n]")


def text_images_part(line: bytes) -> bool:
    """Whether a part's `Content-Disposition:` line makes it a text (not file) field named `images`,
    read with the parser starlette's form parser uses (python-multipart's `parse_options_header`:
    RFC 2231 `name*=`, quoting, parameters in any order): BentoML would fetch such a value as a URL."""
    from python_multipart.multipart import parse_options_header

    _, options = parse_options_header(line.split(b":", 1)[1].strip())
    return options.get(b"name") == b"images" and b"filename" not in options


def disposition_lines(body: bytes) -> list[bytes]:
    """Every line of `body` that starts with `Content-Disposition:` in any case: what the regex
    `(?im)^content-disposition:[^\\r\\n]*` finds, without a case-insensitive regex over every byte
    of the uploaded files (0.69 -> 0.08 ms for a 58 KB one-JPEG body): `bytes.find` on a
    lower-cased copy of 1 MiB at a time, lines cut from the body itself."""
    out, view, n, start, k = [], memoryview(body), len(body), 0, len(_DISPOSITION_KEY)
    while start < n:
        end = min(n, start + _WINDOW)
        low = bytes(view[start:min(n, end + k)]).lower()  # + k: a key that starts before `end`
        i = low.find(_DISPOSITION_KEY)
        while i != -1 and start + i < end:
            pos = start + i
            if pos == 0 or body[pos - 1] == 0x0A:  # at a line start, as `^` under re.M
                eol = _LINE_END.search(body, pos + k)
                out.append(body[pos:eol.start() if eol else n])
            i = low.find(_DISPOSITION_KEY, i + 1)
        start = end
    return out


class GuardMiddleware:
    """Pure ASGI front door: everything here runs before BentoML touches the request."""

    def __init__(self, app, config: ServeConfig = CONFIG, lane: Optional[fast.Lane] = None):
        self.app = app
        self.cfg = config
        self.lane = lane  # POST /classify enters here from the outermost FastEntrance (fast.py)
        if lane is not None:
            lane.guard = self
        self.in_flight = 0  # requests whose body has arrived, until answered
        self.uploading = 0  # requests whose body is still arriving
        self.upload_bytes = UploadBudget(config.max_upload_bytes)

    async def _reply(self, send, status: int, kind: str, detail: str, headers: Optional[list] = None) -> None:
        REJECTIONS.labels(kind=kind).inc()
        body = error_body(kind, detail)
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), OURS]
        if status in (429, 503) and not any(k == b"retry-after" for k, _ in headers or ()):
            hdrs.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    async def _passthrough(self, scope, receive, send, path: str) -> None:
        """Not an API route (probes, docs, UI, unknown paths): BentoML's, errors reshaped."""
        out = Reshaper(send, lambda s, k, d: self._reply(send, s, k, d),
                       lambda status, raw: classify_other_error(status, raw, path))
        await self._run(lambda: self.app(scope, receive, out), out, path)

    async def _run(self, handler, out: Reshaper, path: str) -> None:
        """`handler()` (the app, or the fast path): an exception it lets out is a generic JSON 500
        (Starlette's would be plain text)."""
        try:
            await handler()
        except Exception:  # noqa: BLE001 - logged; the client gets the generic body
            log.exception("unhandled error on %s", path[:100])
            if not out.started:
                await self._reply(out.downstream, 500, "internal", "unexpected server error; see the server log")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        if path == "/docs.json" and method == "GET":
            return await self._docs(scope, receive, send)
        if path in OPEN_PATHS:
            return await self._passthrough(scope, receive, send, path)
        if path.startswith("/admin") and not self.cfg.admin_enabled:
            return await self._reply(send, 404, "not_found", f"{path[:100]} does not exist")
        raw_headers = scope.get("headers", [])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        problem = self._auth_problem(raw_headers)
        if problem:
            return await self._reply(send, *problem)
        if sum(k.lower() == b"content-type" for k, _ in raw_headers) > 1:  # we check the last, BentoML reads the first
            return await self._reply(send, 400, "invalid_request", "more than one Content-Type header")
        # REST aliases BentoML cannot route itself (its APIs are POST and have no path parameters).
        body_override: Optional[bytes] = None
        if method == "GET" and path in ("/tasks", "/tasks/"):
            path, method, body_override = "/tasks/list", "POST", b"{}"
        elif method == "DELETE" and path.startswith("/tasks/"):
            raw = scope.get("raw_path") or path.encode()
            name = unquote(raw.decode("latin-1")[len("/tasks/"):])
            path, method, body_override = "/tasks/delete", "POST", json.dumps({"name": name}).encode()
        if len(path) > 1 and path.endswith("/"):  # not Starlette's 307 to the bare path (its Location echoes Host)
            return await self._reply(send, 404, "not_found", f"{path[:100]} does not exist (no trailing '/')")
        if path not in API_ROUTES and path not in ADMIN_ROUTES:
            return await self._passthrough(scope, receive, send, path)  # docs, schema, UI, 404s
        if method != "POST":
            return await self._reply(send, 405, "method_not_allowed", f"{method} {path} is not supported")
        if body_override is not None:
            scope = dict(scope, path=path, raw_path=path.encode(), method="POST",
                         headers=[(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body_override)).encode())]
                         + [(k, v) for k, v in raw_headers if k.lower() not in (b"content-type", b"content-length")])
            ctype, body = "application/json", body_override
        else:
            raw_ctype = headers.get("content-type", "")
            ctype = raw_ctype.split(";")[0].strip().lower()
            if ctype != raw_ctype.split(";")[0].strip():  # media types are case-insensitive; BentoML's parser choice is not
                normal = (ctype + raw_ctype[len(raw_ctype.split(";")[0]):]).encode("latin-1")
                scope = dict(scope, headers=[(k, normal if k.lower() == b"content-type" else v) for k, v in raw_headers])
            if ctype not in ("multipart/form-data", "application/json"):
                return await self._reply(
                    send, 415, "unsupported_media_type",
                    f"content type {ctype or '(none)'!r} is not accepted; use multipart/form-data or application/json",
                )
            body = await self._receive_body(receive, send, headers.get("content-length"))
            if body is None:
                return
        if self.in_flight >= self.cfg.max_concurrency:
            return await self._reply(send, 429, "overloaded", "too many concurrent requests; retry shortly")
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            timeout = self.cfg.encoder_timeout_s if path in ADMIN_ROUTES else self.cfg.timeout_s
            await self._guarded(scope, receive, send, path, ctype, body, timeout, headers.get("content-type", ""))
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()

    def _auth_problem(self, raw_headers) -> Optional[tuple]:
        """(status, kind, detail, headers) when the request's credentials are not acceptable."""
        given = [v.decode("latin-1") for k, v in raw_headers if k.lower() == b"authorization"]
        if len(given) > 1:
            return 400, "invalid_request", "more than one Authorization header"
        if not self.cfg.auth_token:
            return None
        scheme, _, token = (given[0] if given else "").strip().partition(" ")
        # RFC 7235: the scheme is case-insensitive; compare_digest on the token alone
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.cfg.auth_token.encode())
        return None if ok else (401, "unauthorized", "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])

    async def _receive_body(self, receive, send, content_length: Optional[str]) -> Optional[bytes]:
        """The body, or None when it was refused (answered here) or the client left."""
        if self.uploading >= self.cfg.max_uploads:
            await self._reply(send, 429, "overloaded", "too many request bodies arriving at once; retry shortly",
                              [(b"connection", b"close")])
            return None
        self.uploading += 1
        try:
            return await read_body(receive, content_length=content_length, cap=self.cfg.max_body_bytes,
                                   timeout_s=self.cfg.body_timeout_s, budget=self.upload_bytes)
        except BodyRejected as err:
            await self._reply(send, err.status, err.kind, err.detail, [(b"connection", b"close")] if err.close else None)
        except ClientGone:
            pass
        finally:
            self.uploading -= 1
        return None

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
        if start.get("status") != 200:
            return await self._reply(send, 500, "internal", "could not build the OpenAPI document")
        try:
            body = json.dumps(patch_openapi(json.loads(body), self.cfg.admin_enabled)).encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            log.exception("could not patch the OpenAPI document; serving BentoML's")
        hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": hdrs + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _guarded(self, scope, receive, send, path, ctype, body, timeout, content_type=""):
        if ctype == "application/json":
            problem = json_problem(body)
            if problem:
                return await self._reply(send, 400, "invalid_json", problem)
        else:
            if multipart_truncated(body, content_type):
                return await self._reply(send, 400, "invalid_request",
                                         "the multipart body ends before its closing boundary (--BOUNDARY--)")
            for line in disposition_lines(body):
                if text_images_part(line):
                    return await self._reply(
                        send, 422, "url_not_allowed",
                        "'images' fields must be uploaded files; URLs and strings are not fetched",
                    )

        out = Reshaper(send, lambda s, k, d: self._reply(send, s, k, d), classify_api_error)
        front = self.lane.front if self.lane is not None and self.lane.takes(scope) else None
        fields = fast.read_fields(ctype, content_type, body, self.cfg.max_images) if front is not None else None
        if fields is not None:  # the fast path (fast.py): our endpoint body without BentoML's request path
            del body
            handler = lambda: fast.classify(front, fields, out)  # noqa: E731
        else:
            pending = [body]  # handed to the app once and dropped here: the app holds the only copy
            del body

            async def replay():
                if pending:
                    return {"type": "http.request", "body": pending.pop(), "more_body": False}
                return await receive()

            handler = lambda: self.app(scope, replay, out)  # noqa: E731
        try:
            await asyncio.wait_for(self._run(handler, out, path), timeout=timeout)
        except asyncio.TimeoutError:
            if not out.started:
                await self._reply(send, 504, "timeout", f"not processed within {timeout} s")
