"""serving/hop.py on a real unix socket, no server: frames round-trip, errors and a lost encoder
surface at once as EncoderUnavailable, stale directories of dead encoders are swept."""
from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest

from clipheads.serving import hop


COMING: list[int] = []  # what each submit was told is on its way


def fake_batcher(jobs, deadline, coming=0):
    """What ContinuousBatcher.submit answers: per image logits/features per path, one version."""
    COMING.append(coming)

    async def run():
        out = []
        for j in jobs:
            px = j["pixels"].astype(np.float32)
            out.append({"logits": {p: px.mean(axis=(1, 2)) + p for p in j["paths"]},
                        "features": {p: px[:, 0, :2].ravel() * (p + 1) for p in j["paths"]}, "version": "v1"})
            if px[0, 0, 0] == 7:
                out[-1] = {"error": "internal", "version": "v1"}
        return out
    return run()


def test_round_trip_errors_and_lost_encoder():
    async def go():
        server = hop.HopServer(fake_batcher, max_images=8)
        path = await server.start()
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
        COMING.clear()
        await client.encode(px, [0], 0.0, coming=3)  # the front's count of requests on their way
        assert COMING == [3]
        bad = px.copy()
        bad[1, 0, 0, 0] = 7
        assert (await client.encode(bad, [0], 0.0))[1] == [None, "internal", None]
        too_many = np.zeros((9, 3, 4, 4), np.uint8)
        assert (await client.encode(too_many, [0], 0.0))[1] == ["internal"]
        await server.close()  # stops listening (open connections finish their calls: the drain)
        late = hop.HopClient()
        late.point_to(path)
        with pytest.raises(hop.EncoderUnavailable):  # refused at once, not a hang
            await asyncio.wait_for(late.encode(px, [0], 0.0), 3.0)
        await client.close()

    asyncio.run(go())


def test_in_flight_calls_fail_at_once_when_the_connection_ends():
    async def go():
        gate = asyncio.Event()

        async def slow(jobs, deadline, coming=0):
            await gate.wait()
            return []

        server = hop.HopServer(slow)
        client = hop.HopClient()
        client.point_to(await server.start())
        call = asyncio.ensure_future(client.encode(np.zeros((1, 3, 2, 2), np.uint8), [0], 0.0))
        await asyncio.sleep(0.2)
        client._writer.transport.abort()  # as if the encoder process died under the call
        with pytest.raises(hop.EncoderUnavailable):
            await asyncio.wait_for(call, 2.0)
        gate.set()
        await server.close()

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


class RecordingWriter:
    """The StreamWriter surface FrameWriter uses, recording each write (one per syscall)."""

    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def test_the_encoder_side_sends_one_iterations_frames_in_one_write_and_keeps_their_order():
    big = np.zeros(hop._JOIN_BYTES + 1, np.uint8)

    async def send_all(coalesce: bool):
        w = RecordingWriter()
        out = hop.FrameWriter(w, coalesce=coalesce)
        for i in range(5):
            out.send({"id": i}, [np.full(3, i, np.uint8)])
        out.send({"id": 5}, [big])  # a large frame goes out at once, after what is queued
        out.send({"id": 6}, [])
        await asyncio.sleep(0)  # the end of the iteration
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(w.writes))
        reader.feed_eof()
        ids = [(await hop.read_frame(reader))[0]["id"] for _ in range(7)]
        return len(w.writes), ids

    writes, ids = asyncio.run(send_all(True))
    assert ids == list(range(7)) and writes == 1 + 2 + 1  # 5 small frames, the big one's 2 writes, the last
    writes, ids = asyncio.run(send_all(False))
    assert ids == list(range(7)) and writes == 5 + 2 + 1  # the front: every frame at once
