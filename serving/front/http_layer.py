"""The HTTP layer's own answer in our shape: a request uvicorn cannot parse (a bad or negative
Content-Length, a garbage request line, a malformed header) is refused by the protocol before
any ASGI code runs, with a plain-text 400. BentoML starts uvicorn itself with `http="auto"` and
no way to pass a protocol class, so `install_json_400` makes "auto" name a subclass of the
protocol it would pick (httptools when installed, as requirements/serve.txt pins; else h11) whose
changes are that 400's body and a cap on tiny body pieces: each chunk of a chunked body costs
Python work (h11 parses it in Python, ~13 us; httptools calls uvicorn's `on_body` for it, which
re-copies the body buffered so far), so a 20 MB body sent as 1-byte chunks (20 million of them)
would cost the front minutes of CPU; more than `MAX_SMALL_PIECES` pieces averaging under
`MIN_MEAN_PIECE_BYTES` are refused with a 400. Called by serving/service.py at import, which in a
worker happens before uvicorn resolves "auto"."""
from __future__ import annotations

from .config import CONFIG
from .errors import error_body

# uvicorn has no deadline for a request's line and headers (a slow-loris client holds its connection
# forever, dripping a header byte now and then): each request's headers must be complete this long
# after its first byte (after the connection opened, for the first request); else 408 and close.
HEADER_TIMEOUT_S = CONFIG.header_timeout_s


# Real clients send chunks or reads of kilobytes (httpx, curl: up to 64 KiB; a 1,460-byte TCP
# segment is the smallest a slow link gives); 4,096 pieces averaging under 256 bytes is a flood.
MAX_SMALL_PIECES = 4096
MIN_MEAN_PIECE_BYTES = 256


class _PieceCount:
    """One request's body pieces; `add` returns the refusal once the flood rule is broken."""

    __slots__ = ("pieces", "nbytes")

    def __init__(self) -> None:
        self.pieces = self.nbytes = 0

    def add(self, n: int) -> str:
        self.pieces += 1
        self.nbytes += n
        if self.pieces > MAX_SMALL_PIECES and self.nbytes < self.pieces * MIN_MEAN_PIECE_BYTES:
            return (f"more than {MAX_SMALL_PIECES} body chunks averaging under "
                    f"{MIN_MEAN_PIECE_BYTES} bytes; send the body in larger pieces")
        return ""


def _count_pieces(proto, next_event):
    """`h11.Connection.next_event`, counting each request's body pieces (chunks or reads)."""
    import h11

    def counted():
        event = next_event()
        kind = type(event)
        if kind is h11.Request:
            proto._count = _PieceCount()
        elif kind is h11.Data:
            proto._refusal = proto._count.add(len(event.data))
            if proto._refusal:
                raise h11.RemoteProtocolError(proto._refusal)  # uvicorn answers it with send_400_response
        return event
    return counted


def _answer_and_close(transport, status: bytes, kind: str, detail: str) -> None:
    """The protocol's own answer, before any ASGI code: our JSON body, then the connection closes."""
    body = error_body(kind, detail)
    transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\nx-clipheads: 1\r\n\r\n" % len(body) + body)
    transport.close()


def _json_400(base: type) -> type:
    class JsonErrorProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol; an unparseable request gets `{"error", "detail"}` (then close)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._count = _PieceCount()
            self._refusal = ""
            conn = getattr(self, "conn", None)  # h11's parser
            if conn is not None and hasattr(conn, "next_event"):
                conn.next_event = _count_pieces(self, conn.next_event)

        if hasattr(base, "on_body"):  # httptools: the parser calls these methods of the protocol
            _header_timer = None

            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                self._start_header_deadline()

            def connection_lost(self, exc) -> None:
                self._stop_header_deadline()
                super().connection_lost(exc)

            def on_message_begin(self) -> None:
                super().on_message_begin()
                self._count = _PieceCount()
                self._start_header_deadline()

            def on_headers_complete(self) -> None:
                self._stop_header_deadline()
                super().on_headers_complete()

            def _start_header_deadline(self) -> None:
                self._stop_header_deadline()
                if HEADER_TIMEOUT_S > 0:
                    self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

            def _stop_header_deadline(self) -> None:
                if self._header_timer is not None:
                    self._header_timer.cancel()
                    self._header_timer = None

            def _headers_too_slow(self) -> None:
                self._header_timer = None
                if self.transport.is_closing():
                    return
                _answer_and_close(self.transport, b"408 Request Timeout", "header_timeout",
                                  f"the request line and headers did not arrive within {HEADER_TIMEOUT_S:g} s")

            def on_body(self, body: bytes) -> None:
                self._refusal = self._count.add(len(body))
                if self._refusal:  # httptools raises it as an HttpParserError: send_400_response
                    raise ValueError(self._refusal)
                super().on_body(body)

        def send_400_response(self, msg: str) -> None:
            if self._refusal:
                msg = self._refusal
            _answer_and_close(self.transport, b"400 Bad Request", "invalid_request", f"malformed HTTP request: {msg}")

    JsonErrorProtocol.__name__ = JsonErrorProtocol.__qualname__ = f"JsonError{base.__name__}"
    return JsonErrorProtocol


def install_json_400() -> None:
    from uvicorn.protocols.http import auto

    if not getattr(auto.AutoHTTPProtocol, "_clipheads_json_400", False):
        auto.AutoHTTPProtocol = _json_400(auto.AutoHTTPProtocol)
        auto.AutoHTTPProtocol._clipheads_json_400 = True
