"""Answers the libraries write themselves, reshaped into `{"error", "detail"}`.

BentoML builds its Starlette app itself (no hook for exception handlers), so its 4xx/5xx bodies
(request parsing, unknown paths, wrong methods, a not-ready probe) pass through here on their way
out: an answer not marked as ours (`x-clipheads`) with status >= 400 is buffered and replaced by
our error body with the documented status. Unparseable input that BentoML reports as a 5xx becomes
a 400 on API routes: bad input never yields a 500.
"""
from __future__ import annotations

import json
from typing import Awaitable, Callable


OURS = (b"x-clipheads", b"1")
_PASS_STATUSES = (401, 403, 405, 413, 415, 422, 429)


def _library_detail(raw: bytes) -> str:
    """BentoML's error text: {"error": ..., "detail": [pydantic errors]} or plain text."""
    try:
        parsed = json.loads(raw)
        if isinstance(parsed, list) and parsed:
            parsed = parsed[0]
        if not isinstance(parsed, dict):
            return str(parsed)
        detail = str(parsed.get("error", ""))
        extra = parsed.get("detail")
        if isinstance(extra, list):
            detail += ": " + "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
                                       for e in extra if isinstance(e, dict))
        elif extra:
            detail += f": {extra}"
        return detail
    except (ValueError, UnicodeDecodeError, AttributeError):
        return raw[:200].decode("utf-8", "replace").strip()


def classify_api_error(status: int, raw: bytes) -> tuple[int, str, str]:
    """(status, kind, detail) for BentoML's own error answer on an API route."""
    detail = _library_detail(raw)
    if status >= 500 and status not in (503, 504):
        return 400, "invalid_request", "malformed request (could not be parsed)"
    if status == 503:
        return 503, "overloaded", detail
    if status == 504:
        return 504, "timeout", detail
    if status == 404:
        return 404, "not_found", detail
    if status == 415:  # the table's kind for a media type refused (ERROR_CODES), whoever refused it
        return 415, "unsupported_media_type", detail
    return (status if status in _PASS_STATUSES else 400), "invalid_request", detail


def classify_other_error(status: int, raw: bytes, path: str) -> tuple[int, str, str]:
    """(status, kind, detail) for a library answer outside the API routes (404s, probes, docs)."""
    if status == 404:
        return 404, "not_found", f"{path[:100]} does not exist"
    if status == 405:
        return 405, "method_not_allowed", f"this method is not supported on {path[:100]}"
    if status in (500, 503) and path == "/readyz":
        return 503, "not_ready", "the service is not ready"
    if status == 503:
        return 503, "unavailable", "the service is not available"
    if status >= 500:
        return status, "internal", "unexpected server error; see the server log"
    return status, "invalid_request", _library_detail(raw)[:1000]


Send = Callable[[dict], Awaitable[None]]


class Reshaper:
    """A `send` that passes our answers and 2xx/3xx through and reshapes library error answers.
    `reply(status, kind, detail)` writes our body; `started` says whether anything was sent."""

    def __init__(self, send: Send, reply: Callable[[int, str, str], Awaitable[None]],
                 classify: Callable[[int, bytes], tuple[int, str, str]]):
        self.downstream, self._reply, self._classify = send, reply, classify
        self.started = False
        self._status = 0
        self._buf: list[bytes] | None = None

    async def __call__(self, msg: dict) -> None:
        if msg["type"] == "http.response.start":
            status, hdrs = msg["status"], msg.get("headers", [])
            if status >= 400 and not any(k.lower() == OURS[0] for k, _ in hdrs):
                self._status, self._buf = status, []  # a library's error: reshape it
                return
            self.started = True
            return await self.downstream(msg)
        if msg["type"] == "http.response.body" and self._buf is not None:
            self._buf.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            status, kind, detail = self._classify(self._status, b"".join(self._buf))
            self._buf = None
            self.started = True
            return await self._reply(status, kind, detail[:1000])
        return await self.downstream(msg)
