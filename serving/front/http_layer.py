"""The HTTP layer's own answer in our shape: a request uvicorn cannot parse (a bad or negative
Content-Length, a garbage request line, a malformed header) is refused by the protocol before
any ASGI code runs, with a plain-text 400. BentoML starts uvicorn itself with `http="auto"` and
no way to pass a protocol class, so `install_json_400` makes "auto" name a subclass of the
protocol it would pick whose changes are that 400's body and, on uvicorn's pure-Python h11
protocol, a cap on tiny body pieces: h11 parses each chunk of a chunked body in Python (~13 us
each), so a 20 MB body sent as 1-byte chunks (20 million of them) would cost the front minutes of
CPU; more than `MAX_SMALL_PIECES` pieces averaging under `MIN_MEAN_PIECE_BYTES` are refused with
a 400 there. Called by serving/service.py at import, which in a worker happens before uvicorn
resolves "auto"."""
from __future__ import annotations

from .errors import error_body


# Real clients send chunks or reads of kilobytes (httpx, curl: up to 64 KiB; a 1,460-byte TCP
# segment is the smallest a slow link gives); 4,096 pieces averaging under 256 bytes is a flood.
MAX_SMALL_PIECES = 4096
MIN_MEAN_PIECE_BYTES = 256


def _count_pieces(proto, next_event):
    """`h11.Connection.next_event`, counting each request's body pieces (chunks or reads)."""
    import h11

    def counted():
        event = next_event()
        kind = type(event)
        if kind is h11.Request:
            proto._pieces = proto._piece_bytes = 0
        elif kind is h11.Data:
            proto._pieces += 1
            proto._piece_bytes += len(event.data)
            if proto._pieces > MAX_SMALL_PIECES and proto._piece_bytes < proto._pieces * MIN_MEAN_PIECE_BYTES:
                proto._refusal = (f"more than {MAX_SMALL_PIECES} body chunks averaging under "
                                  f"{MIN_MEAN_PIECE_BYTES} bytes; send the body in larger pieces")
                raise h11.RemoteProtocolError(proto._refusal)  # uvicorn answers it with send_400_response
        return event
    return counted


def _json_400(base: type) -> type:
    class JsonErrorProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol; an unparseable request gets `{"error", "detail"}` (then close)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._pieces = self._piece_bytes = 0
            self._refusal = ""
            conn = getattr(self, "conn", None)  # h11's parser (httptools parses chunks in C: no cap needed)
            if conn is not None and hasattr(conn, "next_event"):
                conn.next_event = _count_pieces(self, conn.next_event)

        def send_400_response(self, msg: str) -> None:
            if self._refusal:
                msg = self._refusal
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
