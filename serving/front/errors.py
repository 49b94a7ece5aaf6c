"""The service's error contract: every error answer is `{"error": kind, "detail": text}`."""
from __future__ import annotations

import json

ERROR_CODES = {
    "400": "invalid_json / invalid_request / invalid_base64", "401": "unauthorized (when a token is set)",
    "408": "body_timeout (the body did not arrive within CLIPHEADS_BODY_TIMEOUT_S) / header_timeout (the request "
           "line and headers did not arrive within CLIPHEADS_HEADER_TIMEOUT_S)",
    "404": "not_found / unknown_task", "405": "method_not_allowed",
    "409": "task_exists / task_readonly / incompatible_head",
    "413": "body_too_large / too_many_bytes / too_many_pixels", "415": "unsupported_media_type / unsupported_format",
    "422": "invalid input (image, labels, task, top_k, ...)", "429": "overloaded (Retry-After)",
    "500": "internal (generic body)",
    "503": "not_ready / overloaded / decode_busy / tasks_store_unavailable / unavailable (Retry-After)",
    "504": "timeout",
}


class ApiError(Exception):
    """A request answered with `status` and `{"error": kind, "detail": detail}`."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class EncoderFailure(RuntimeError):
    """The runtime raised on this request's images (details are in the encoder's log only)."""


def error_body(kind: str, detail: str) -> bytes:
    return json.dumps({"error": kind, "detail": detail}).encode()
