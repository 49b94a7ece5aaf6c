"""The HTTP layer's own answer in our shape: a request uvicorn cannot parse (a bad or negative
Content-Length, a garbage request line, a malformed header) is refused by the protocol before
any ASGI code runs, with a plain-text 400. BentoML starts uvicorn itself with `http="auto"` and
no way to pass a protocol class, so `install_json_400` makes "auto" name a subclass of the
protocol it would pick whose only change is that 400's body. Called by serving/service.py at
import, which in a worker happens before uvicorn resolves "auto"."""
from __future__ import annotations

from .errors import error_body


def _json_400(base: type) -> type:
    class JsonErrorProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol; an unparseable request gets `{"error", "detail"}` (then close)."""

        def send_400_response(self, msg: str) -> None:
            body = error_body("invalid_request", f"malformed HTTP request: {msg}")
            head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\nx-clipheads: 1\r\n\r\n" % len(body))
            self.transport.write(head + body)
            self.transport.close()

    JsonErrorProtocol.__name__ = JsonErrorProtocol.__qualname__ = f"JsonError{base.__name__}"
    return JsonErrorProtocol


def install_json_400() -> None:
    from uvicorn.protocols.http import auto

    if not getattr(auto.AutoHTTPProtocol, "_clipheads_json_400", False):
        auto.AutoHTTPProtocol = _json_400(auto.AutoHTTPProtocol)
        auto.AutoHTTPProtocol._clipheads_json_400 = True
