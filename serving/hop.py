"""The image hop from the front to the encoder: length-prefixed frames on a private unix socket.

BentoML's own inter-service call (an HTTP request over its socket, pickled arguments, pydantic
validation, schema work, access log, metrics and tracing on both sides) cost the encoder ~4.5 ms
of CPU per 1-image request on the tiny bundle, against ~0.3 ms of model time
(bench/serving/results/overhead.md). `encode` is the only call on the hot path, so it travels here
instead: one frame per request, a JSON header plus the raw uint8 pixels; the answer is a JSON
header plus the raw float32 logits and features. No pickle: the encoder never unpickles what the
front sends.

    frame = struct "!II" (header bytes, data bytes) + header (UTF-8 JSON object) + data

The encoder listens in a fresh 0700 directory of its own (named in its `ping`/`info` answers), so
BentoML deleting its socket directory at shutdown never cuts this path (drain.py). One connection
per front process, calls multiplexed by id. When the encoder dies, the connection ends and every
call on it fails at once with `EncoderUnavailable` (the front answers 503 + Retry-After) instead
of waiting for a restarted encoder behind circus's listening socket.

The front's side is asyncio (it lives in uvicorn's loop); the encoder's side is plain threads
(`HopServer`), which hand frames straight to the batcher's queue: no task, future or executor
wake-up per request (bench/serving/encoder_hop.py).
"""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

log = logging.getLogger("clipheads.serving")

_PREFIX = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 20
MAX_DATA_BYTES = 1 << 30  # 32 images of 3 x 2048 x 2048 uint8 is 400 MB; anything larger is not ours
_DIR_PREFIX = "clipheads-hop-"
# Frames up to this size are joined into one write: each write to the socket is a syscall that
# wakes the other process (the front's two writes per 1-image request cost ~0.8 ms of its CPU
# under load, profile tiny-c8); above it, the copy would cost more than the extra syscalls.
_JOIN_BYTES = 256 * 1024

class EncoderUnavailable(ConnectionError):
    """The encoder process cannot be reached (dead, restarting, or gone after shutdown)."""


class FrameError(ValueError):
    """A frame that breaks the protocol (sizes over the caps, bad header)."""


def _sizes(prefix: bytes) -> tuple[int, int]:
    hlen, dlen = _PREFIX.unpack(prefix)
    if hlen > MAX_HEADER_BYTES or dlen > MAX_DATA_BYTES:
        raise FrameError(f"frame of {hlen} + {dlen} bytes is over the caps")
    return hlen, dlen


def _header(raw: bytes) -> dict:
    try:
        head = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise FrameError("frame header is not JSON") from err
    if not isinstance(head, dict):
        raise FrameError("frame header is not a JSON object")
    return head


def _prefix(head: dict, data_bytes: int) -> bytes:
    h = json.dumps(head, separators=(",", ":")).encode()
    return _PREFIX.pack(len(h), data_bytes) + h


def encode_frame(head: dict, chunks: list) -> bytes:
    # bytes views of the arrays; an empty array (a path with no logit columns) has no castable view
    views = [memoryview(c).cast("B") if getattr(c, "size", 1) else memoryview(b"") for c in chunks]
    return b"".join([_prefix(head, sum(v.nbytes for v in views)), *views])


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    hlen, dlen = _sizes(await reader.readexactly(_PREFIX.size))
    head = _header(await reader.readexactly(hlen))
    return head, (await reader.readexactly(dlen)) if dlen else b""


def read_frame_blocking(stream: io.BufferedReader) -> tuple[dict, bytes]:
    """The same frame from a buffered socket file (the encoder's reader threads); EOFError at the end."""
    def exactly(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise EOFError
        return data

    hlen, dlen = _sizes(exactly(_PREFIX.size))
    head = _header(exactly(hlen))
    return head, exactly(dlen) if dlen else b""


class FrameWriter:
    """The front's frames onto its one connection. A frame is written with no await inside it, so
    frames of concurrent calls never interleave. Each request leaves at once: the front's loop
    decodes the next requests' images inline, and a frame held behind those decodes would idle the
    encoder (measured: fuller passes but p99 +45% at c=32, overhead-16-coalesced-frames.md)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    def send(self, head: dict, chunks: list) -> None:
        size = sum(memoryview(c).nbytes for c in chunks)
        if size > _JOIN_BYTES:  # the copy would cost more than the extra syscalls
            self.writer.write(_prefix(head, size))
            for c in chunks:
                self.writer.write(memoryview(c).cast("B"))
            return
        self.writer.write(encode_frame(head, chunks))  # one write, one syscall, one wake-up of the reader

    async def drain(self) -> None:
        await self.writer.drain()


# ---- encoder side ------------------------------------------------------------------------------
def pack_results(rid: int, results: list[dict], paths: list[int]) -> tuple[dict, list[np.ndarray]]:
    """The batcher's per-image results -> (header, arrays): per path, (N, C) logits and (N, E)
    features as float32, or the per-image error kinds when any image failed."""
    versions = sorted({str(r.get("version", "")) for r in results})
    errors = [r.get("error") for r in results]
    if len(versions) > 1:  # cannot happen (one request, one pass); never answer a mix
        errors = ["internal"] * len(results)
    head: dict[str, Any] = {"id": rid, "version": versions[0] if versions else ""}
    if any(errors):
        head["errors"] = errors
        return head, []
    arrays, outputs = [], []
    for p in paths:
        logits = np.ascontiguousarray(np.stack([r["logits"][p] for r in results]), np.float32)
        feats = np.ascontiguousarray(np.stack([r["features"][p] for r in results]), np.float32)
        outputs.append([int(p), list(logits.shape), list(feats.shape)])
        arrays += [logits, feats]
    head["outputs"] = outputs
    return head, arrays


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(sock_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(sock_path))
        except OSError:
            return False
    return True


def sweep_stale_dirs(root: Optional[str] = None) -> None:
    """Remove hop directories left by encoders that were SIGKILLed: the pid in the name is gone
    and nothing listens on the socket (a pid from another pid namespace sharing /tmp still listens)."""
    base = Path(root or tempfile.gettempdir())
    for d in base.glob(_DIR_PREFIX + "*"):
        m = re.match(re.escape(_DIR_PREFIX) + r"(\d+)-", d.name)
        try:
            if m and d.is_dir() and d.stat().st_uid == os.getuid() and not _pid_alive(int(m.group(1))) \
                    and not _listening(d / "encoder.sock"):
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


class _Connection:
    """One front's connection on the encoder side. Answers queue here as the runner delivers
    them; `flush` sends everything queued in one write after each pass (one syscall and one
    wake-up of the front for all of a pass's answers)."""

    def __init__(self, sock: socket.socket, send_timeout_s: float):
        # A front that stops reading is dropped, never the runner stalled. SO_SNDTIMEO, not
        # settimeout(): the socket stays blocking, so reads and writes are one syscall each (no poll).
        sec = int(send_timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((send_timeout_s - sec) * 1e6)))
        self.sock = sock
        self._queued: list[bytes] = []
        self._lock = threading.Lock()
        self.closed = False

    def queue(self, frame: bytes) -> None:
        with self._lock:
            if not self.closed:
                self._queued.append(frame)

    def flush(self) -> None:
        with self._lock:
            if not self._queued or self.closed:
                return
            data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
            self._queued.clear()
            try:
                self.sock.sendall(data)
            except OSError as err:  # gone, or not reading for send_timeout_s
                log.warning("hop: dropping a front connection: %s", err)
                self._close_locked()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            self._queued.clear()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes this connection's reader thread
            except OSError:
                pass
            self.sock.close()


class Batcher(Protocol):
    """What the hop needs of encoder/batching.py's ContinuousBatcher."""

    def submit_nowait(self, jobs: list, deadline: float, coming: int, deliver: Callable[[list], None],
                      abandoned: Callable[[], bool] = ...) -> None: ...

    def add_pass_listener(self, listener: Callable[[], None]) -> None: ...


class HopServer:
    """The encoder's listener. No event loop: an accept thread, one reader thread per front
    connection, each `encode` frame handed to the batcher's queue (`submit_nowait`); the answers
    of a pass go out together when the batcher says the pass is done."""

    def __init__(self, batcher: Batcher, max_images: int = 256, send_timeout_s: float = 10.0):
        self.batcher = batcher
        self.max_images = max_images
        self.send_timeout_s = send_timeout_s
        self.dir: Optional[Path] = None
        self.path = ""
        self._listener: Optional[socket.socket] = None
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        batcher.add_pass_listener(self._flush)

    def start(self) -> str:
        sweep_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))  # 0700: this user only
        self.path = str(self.dir / "encoder.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), name="hop-accept", daemon=True).start()
        return self.path

    def close(self) -> None:
        """Stop listening (open connections finish their calls: the drain)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            listener.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            conn = _Connection(sock, self.send_timeout_s)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="hop-reader", daemon=True).start()

    def _serve(self, conn: _Connection) -> None:
        stream = conn.sock.makefile("rb", buffering=1 << 20)  # many frames per recv under load
        try:
            while True:
                head, data = read_frame_blocking(stream)
                self._encode(conn, head, data)
        except (EOFError, OSError):
            pass  # the front closed its end (it exited, or dropped the connection)
        except FrameError as err:
            log.warning("hop: dropping a connection: %s", err)
        finally:
            stream.close()
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def _encode(self, conn: _Connection, head: dict, data: bytes) -> None:
        rid = head.get("id", 0)
        try:
            shape = tuple(int(x) for x in head["shape"])
            paths = [int(p) for p in head["paths"]]
            if len(shape) != 4 or shape[1] != 3 or not 0 < shape[0] <= self.max_images or \
                    int(np.prod(shape)) != len(data):
                raise ValueError(f"pixels of {len(data)} bytes do not match shape {shape}")
            pixels = np.frombuffer(data, np.uint8).reshape(shape)
            jobs = [{"paths": paths, "pixels": pixels[i]} for i in range(shape[0])]
            coming = max(0, int(head.get("coming") or 0))  # the front's requests on their way here
            deadline = float(head.get("deadline") or 0.0)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("hop: bad encode frame: %s", err)
            return self._refuse(conn, rid)

        def deliver(results: list) -> None:
            conn.queue(encode_frame(*pack_results(rid, results, paths)))

        try:
            self.batcher.submit_nowait(jobs, deadline, coming, deliver, abandoned=lambda: conn.closed)
        except RuntimeError:  # the batcher closed: this encoder is shutting down
            self._refuse(conn, rid)

    @staticmethod
    def _refuse(conn: _Connection, rid: Any) -> None:
        conn.queue(encode_frame({"id": rid, "version": "", "errors": ["internal"]}, []))
        conn.flush()

    def _flush(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.flush()


# ---- front side --------------------------------------------------------------------------------
def unpack_results(head: dict, data: bytes) -> dict[int, dict[str, np.ndarray]]:
    out, offset = {}, 0
    for p, lshape, fshape in head["outputs"]:
        arrs = []
        for shape in (lshape, fshape):
            n = int(np.prod(shape))
            arrs.append(np.frombuffer(data, np.float32, n, offset).reshape(shape))
            offset += 4 * n
        out[int(p)] = {"logits": arrs[0], "features": arrs[1]}
    return out


class HopClient:
    """The front's one connection to the encoder's hop (opened on first use, re-opened after a
    loss). Every failure to reach the encoder is `EncoderUnavailable`, raised at once."""

    def __init__(self) -> None:
        self.path = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: Optional[asyncio.StreamWriter] = None
        self._frames: Optional[FrameWriter] = None  # frames onto _writer
        self._reader_task: Optional[asyncio.Task] = None
        self._connecting: Optional[asyncio.Future] = None

    @property
    def in_flight(self) -> int:
        """encode calls sent and not yet answered."""
        return len(self._pending)

    def point_to(self, path: str) -> None:
        """The encoder's current hop socket (from its ping); a new path means a new encoder."""
        if path != self.path:
            self.path = path
            self._drop(EncoderUnavailable("the encoder was restarted"))

    async def encode(self, pixels: np.ndarray, paths: list[int], deadline: float,
                     timeout: Optional[float] = None, coming: int = 0) -> tuple[str, Optional[list], dict]:
        """-> (head version, per-image error kinds or None, {path: {"logits", "features"}}).
        `coming`: the front's other admitted requests that have not reached the encoder yet (the
        batcher may wait for them, encoder/batching.py)."""
        pixels = np.ascontiguousarray(pixels, np.uint8)
        writer = await self._connection()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            writer.send({"id": rid, "op": "encode", "paths": [int(p) for p in paths],
                         "shape": list(pixels.shape), "deadline": deadline, "coming": int(coming)}, [pixels])
            await writer.drain()
            head, data = await (asyncio.wait_for(fut, timeout) if timeout else fut)
        except EncoderUnavailable:
            raise
        except ConnectionError as err:  # a write on a connection the encoder already closed
            self._drop(EncoderUnavailable(f"lost the encoder: {err}"))
            raise EncoderUnavailable(f"lost the encoder: {err}") from err
        finally:
            self._pending.pop(rid, None)
        if head.get("errors"):
            return head.get("version", ""), list(head["errors"]), {}
        return head.get("version", ""), None, unpack_results(head, data)

    async def close(self) -> None:
        self._drop(EncoderUnavailable("the front is shutting down"))

    async def _connection(self) -> FrameWriter:
        if self._writer is not None and not self._writer.is_closing() and self._frames is not None:
            return self._frames
        if not self.path:
            raise EncoderUnavailable("the encoder's hop is not known yet")
        if self._connecting is None:  # one connect for all callers that arrive meanwhile
            self._connecting = asyncio.ensure_future(self._open(self.path))
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self, path: str) -> FrameWriter:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), 2.0)
        except (OSError, asyncio.TimeoutError) as err:  # refused (no listener), no such file, ...
            raise EncoderUnavailable(f"cannot reach the encoder at {path}: {err}") from err
        self._writer, self._frames = writer, FrameWriter(writer)
        self._reader_task = asyncio.ensure_future(self._read_answers(reader, writer))
        return self._frames

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "the encoder closed the connection"
        try:
            while True:
                head, data = await read_frame(reader)
                fut = self._pending.get(head.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result((head, data))
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            reason = f"the encoder connection ended ({type(err).__name__})"
        except FrameError as err:
            reason = f"protocol error from the encoder: {err}"
        except asyncio.CancelledError:
            return
        if self._writer is writer:
            self._drop(EncoderUnavailable(reason))

    def _drop(self, err: EncoderUnavailable) -> None:
        """Close the connection and fail every call waiting on it."""
        writer, self._writer, self._frames = self._writer, None, None
        task, self._reader_task = self._reader_task, None
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(err)
