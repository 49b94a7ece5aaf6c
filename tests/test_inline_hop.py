"""serving/inline.py: the front's encode calls straight onto the real continuous batcher.

The runtime is the marker stand-in of test_encoder_batching.py (each image answered with its own
first pixel), so every concurrent request must get exactly its own rows back; answers are settled
once per pass; a request that timed out is skipped; a closed batcher is EncoderUnavailable (503).
End to end (a real server in both layouts): tests/test_serving.py, tests/test_serving_ops.py.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clipheads.serving.encoder.batching import ContinuousBatcher
from clipheads.serving.hop import EncoderUnavailable
from clipheads.serving.inline import InlineHop
from test_encoder_batching import MarkerRuntime, Slot


class Core:
    """What InlineHop needs of an EncoderCore: its batcher."""

    def __init__(self, pass_s: float):
        self.runtime = MarkerRuntime(pass_s)
        self.batcher = ContinuousBatcher(Slot(self.runtime), max_batch=64)

    def close(self) -> None:
        self.batcher.close()


def pixels(*markers: int) -> np.ndarray:
    return np.stack([np.full((3, 4, 4), m, np.uint8) for m in markers])


def test_concurrent_requests_get_their_own_rows_settled_per_pass():
    core = Core(0.02)
    hop = InlineHop(core)
    settles = []

    async def go():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(cb, *args):  # how often the runner wakes this loop
            settles.append(len(args[0]))
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        calls = [hop.encode(pixels(k, k + 100), [0], 0.0) for k in range(24)]
        out = await asyncio.gather(*calls)
        assert hop.in_flight == 0
        return out

    try:
        out = asyncio.run(go())
    finally:
        asyncio.run(hop.close())
    for k, (version, errors, res) in enumerate(out):
        assert version == "v1" and errors is None
        assert res[0]["logits"][:, 0].tolist() == [k, k + 100]  # its own two images, in order
        assert res[0]["features"].shape == (2, 4)
    assert sum(settles) == 24 and len(settles) == len(core.runtime.sizes) < 24  # one wake-up per pass


def test_timed_out_call_is_skipped_and_a_closed_batcher_is_unavailable():
    core = Core(0.3)
    hop = InlineHop(core)

    async def go():
        first = asyncio.ensure_future(hop.encode(pixels(1), [0], 0.0))  # occupies the runner
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await hop.encode(pixels(2), [0], 0.0, timeout=0.1)  # gives up while queued
        version, errors, res = await first
        await asyncio.sleep(0.4)  # the runner would have run the abandoned call by now
        assert errors is None and res[0]["logits"][:, 0].tolist() == [1]
        assert core.runtime.sizes == [1]  # the timed-out request never reached the runtime
        await hop.close()
        with pytest.raises(EncoderUnavailable):
            await hop.encode(pixels(3), [0], 0.0)

    asyncio.run(go())
