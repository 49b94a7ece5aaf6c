"""`GuardMiddleware`: the pure-ASGI front door; everything here runs before BentoML parses a request.

Bearer auth, content-type allow-list (pickle/octet-stream -> 415), body byte cap while streaming
(413, also without Content-Length), no URL strings where files are expected, concurrency limit
(fast 429 + Retry-After), request timeout (504), the REST aliases BentoML cannot route
(`GET /tasks`, `DELETE /tasks/{name}`), and BentoML's own 4xx/5xx bodies for unparseable input
rewritten into `{"error", "detail"}` (as 400), so bad input never yields a 500.
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
from .config import ADMIN_ROUTES, API_ROUTES, CONFIG, OPEN_PATHS, ServeConfig
from .errors import error_body
from .openapi import patch_openapi

log = logging.getLogger("clipheads.serving")

_DISPOSITION = re.compile(rb"(?im)^content-disposition:[^\r\n]*")
_NAME_IMAGES = re.compile(rb"""(?i)[;\s]name=("images"|images\b)""")


class GuardMiddleware:
    """Pure ASGI front door: everything here runs before BentoML touches the request."""

    def __init__(self, app, config: ServeConfig = CONFIG):
        self.app = app
        self.cfg = config
        self.in_flight = 0

    async def _reply(self, send, status: int, kind: str, detail: str, headers: Optional[list] = None) -> None:
        REJECTIONS.labels(kind=kind).inc()
        body = error_body(kind, detail)
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
            timeout = self.cfg.encoder_timeout_s if path in ADMIN_ROUTES else self.cfg.timeout_s
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
