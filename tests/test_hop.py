"""serving/hop.py on a real unix socket, no server: frames round-trip, errors and a lost encoder
surface at once as EncoderUnavailable, stale directories of dead encoders are swept."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipheads.serving import hop


class FakeBatcher:
    """ContinuousBatcher's surface for the hop: per image logits/features per path, one version,
    each request delivered on a thread of its own (as the runner thread does), then the pass end."""

    def __init__(self, gate: threading.Event | None = None):
        self.coming: list[int] = []  # what each submit was told is on its way
        self.gate = gate
        self.listeners: list = []

    def add_pass_listener(self, listener) -> None:
        self.listeners.append(listener)

    def submit_nowait(self, jobs, deadline, coming, deliver, abandoned=lambda: False) -> None:
        self.coming.append(coming)
        threading.Thread(target=self._run, args=(jobs, deliver), daemon=True).start()

    def _run(self, jobs, deliver) -> None:
        if self.gate is not None:
            self.gate.wait()
        out = []
        for j in jobs:
            px = j["pixels"].astype(np.float32)
            out.append({"logits": {p: px.mean(axis=(1, 2)) + p for p in j["paths"]},
                        "features": {p: px[:, 0, :2].ravel() * (p + 1) for p in j["paths"]}, "version": "v1"})
            if px[0, 0, 0] == 7:
                out[-1] = {"error": "internal", "version": "v1"}
        deliver(out)
        for listener in self.listeners:
            listener()


def test_round_trip_errors_and_lost_encoder():
    async def go():
        batcher = FakeBatcher()
        server = hop.HopServer(batcher, max_images=8)
        path = server.start()
        assert oct(os.stat(Path(path).parent).st_mode & 0o777) == "0o700"
        client = hop.HopClient()
        client.point_to(path)
        px = np.random.default_rng(0).integers(0, 255, (3, 3, 4, 4), dtype=np.uint8)
        results = await asyncio.gather(*(client.encode(px, [0, 2], 0.0) for _ in range(5)))  # multiplexed
        for version, errors, out in results:
            assert version == "v1" and errors is None
            for p in (0, 2):
                np.testing.assert_array_equal(out[p]["logits"], px.astype(np.float32).mean(axis=(2, 3)) + p)
                np.testing.assert_array_equal(out[p]["features"], px[:, :, 0, :2].astype(np.float32).reshape(3, -1) * (p + 1))
        batcher.coming.clear()
        await client.encode(px, [0], 0.0, coming=3)  # the front's count of requests on their way
        assert batcher.coming == [3]
        bad = px.copy()
        bad[1, 0, 0, 0] = 7
        assert (await client.encode(bad, [0], 0.0))[1] == [None, "internal", None]
        too_many = np.zeros((9, 3, 4, 4), np.uint8)
        assert (await client.encode(too_many, [0], 0.0))[1] == ["internal"]
        server.close()  # stops listening (open connections finish their calls: the drain)
        assert (await client.encode(px, [0], 0.0))[1] is None
        late = hop.HopClient()
        late.point_to(path)
        with pytest.raises(hop.EncoderUnavailable):  # refused at once, not a hang
            await asyncio.wait_for(late.encode(px, [0], 0.0), 3.0)
        await client.close()

    asyncio.run(go())


def test_in_flight_calls_fail_at_once_when_the_connection_ends():
    async def go():
        gate = threading.Event()
        server = hop.HopServer(FakeBatcher(gate))
        client = hop.HopClient()
        client.point_to(server.start())
        call = asyncio.ensure_future(client.encode(np.zeros((1, 3, 2, 2), np.uint8), [0], 0.0))
        await asyncio.sleep(0.2)
        client._writer.transport.abort()  # as if the encoder process died under the call
        with pytest.raises(hop.EncoderUnavailable):
            await asyncio.wait_for(call, 2.0)
        gate.set()
        server.close()

    asyncio.run(go())


def test_a_front_that_stops_reading_is_dropped_not_waited_for():
    """The runner thread writes the answers: a connection whose reader stalls must not stall it."""
    async def go():
        batcher = FakeBatcher()
        server = hop.HopServer(batcher, send_timeout_s=0.3)
        path = server.start()
        stalled = socket.socket(socket.AF_UNIX)
        stalled.connect(path)  # sends requests, never reads an answer
        px = np.zeros((8, 3, 64, 64), np.uint8)
        frame = hop.encode_frame({"id": 1, "op": "encode", "paths": [0], "shape": list(px.shape)}, [px])
        for _ in range(400):  # answers of 8 x 12 floats each: far more than the socket buffers
            try:
                stalled.sendall(frame)
            except OSError:
                break  # the encoder gave up on it: good
        client = hop.HopClient()  # another front is still served
        client.point_to(path)
        one = np.ones((1, 3, 2, 2), np.uint8)
        assert (await asyncio.wait_for(client.encode(one, [0], 0.0), 5.0))[1] is None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(server._conns) > 1:
            await asyncio.sleep(0.05)
        assert len(server._conns) == 1  # the stalled one was closed
        stalled.close()
        await client.close()
        server.close()

    asyncio.run(go())


def test_sweep_keeps_live_and_foreign_dirs():
    root = Path(tempfile.mkdtemp())
    dead = root / "clipheads-hop-999999-a"
    dead.mkdir()
    (dead / "encoder.sock").touch()
    live = root / "clipheads-hop-999998-b"  # pid unknown here, but something listens: keep
    live.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(live / "encoder.sock"))
        s.listen(1)
        mine = root / f"clipheads-hop-{os.getpid()}-c"
        mine.mkdir()
        hop.sweep_stale_dirs(str(root))
        assert sorted(p.name for p in root.iterdir()) == sorted([live.name, mine.name])


class RecordingSocket:
    """The socket surface _Connection uses, recording each sendall (one per syscall)."""

    def __init__(self):
        self.writes: list[bytes] = []

    def setsockopt(self, *args) -> None:
        pass

    def sendall(self, data) -> None:
        self.writes.append(bytes(data))


def test_a_pass_answers_leave_in_one_write_and_in_order():
    sock = RecordingSocket()
    conn = hop._Connection(sock, 1.0)
    for i in range(5):
        conn.queue(hop.encode_frame({"id": i}, [np.full(3, i, np.uint8)]))
    conn.flush()
    conn.flush()  # nothing queued: no write
    assert len(sock.writes) == 1
    stream = io.BufferedReader(io.BytesIO(sock.writes[0]))
    got = [hop.read_frame_blocking(stream) for _ in range(5)]
    assert [h["id"] for h, _ in got] == list(range(5)) and [d for _, d in got] == [bytes([i] * 3) for i in range(5)]
    with pytest.raises(EOFError):
        hop.read_frame_blocking(stream)


def test_the_front_sends_every_frame_at_once():
    class RecordingWriter:
        def __init__(self):
            self.writes: list[bytes] = []

        def write(self, data) -> None:
            self.writes.append(bytes(data))

    big = np.zeros(hop._JOIN_BYTES + 1, np.uint8)

    async def send_all():
        w = RecordingWriter()
        out = hop.FrameWriter(w)
        for i in range(5):
            out.send({"id": i}, [np.full(3, i, np.uint8)])
        out.send({"id": 5}, [big])  # a large frame: prefix+header, then the data, no copy
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(w.writes))
        reader.feed_eof()
        ids = [(await hop.read_frame(reader))[0]["id"] for _ in range(6)]
        return len(w.writes), ids

    writes, ids = asyncio.run(send_all())
    assert ids == list(range(6)) and writes == 5 + 2
