"""encoder/batching.py: the continuous batcher waits for the requests the front says are coming.

The batcher is the real one; its runtime is a stand-in whose pass takes a fixed time and answers
each image with its own marker, so every request can be checked to get its own rows back.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from clipheads.serving.encoder.batching import MIN_COMING, ContinuousBatcher


class MarkerRuntime:
    """run_path -> logits [marker, pass size]: the image's first pixel and the size of its pass."""

    def __init__(self, pass_s: float):
        self.pass_s = pass_s
        self.sizes: list[int] = []

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False):
        time.sleep(self.pass_s)
        self.sizes.append(len(pixels))
        n = len(pixels)
        logits = np.stack([pixels[:, 0, 0, 0].astype(np.float32), np.full(n, n, np.float32)], axis=1)
        return logits, np.zeros((n, 4), np.float32)


class Slot:
    def __init__(self, runtime):
        self.current = type("Head", (), {"runtime": runtime, "version": "v1"})()


def job(marker: int) -> dict:
    return {"paths": [0], "pixels": np.full((3, 4, 4), marker, np.uint8)}


async def _arrivals(batcher: ContinuousBatcher, n: int, gap_s: float) -> list:
    """n requests gap_s apart, each saying how many are still to come (what a busy front sends)."""
    async def one(k: int):
        await asyncio.sleep(k * gap_s)
        return k, await batcher.submit([job(k)], 0.0, n - 1 - k)

    try:
        return await asyncio.gather(*(one(k) for k in range(n)))
    finally:
        batcher.close()


def test_a_lone_client_or_a_few_never_wait():
    rt = MarkerRuntime(0.002)
    batcher = ContinuousBatcher(Slot(rt), max_batch=64, wait_ms=200)

    async def sequential():
        try:
            return [await batcher.submit([job(k)], 0.0, k % MIN_COMING) for k in range(10)]
        finally:
            batcher.close()

    t0 = time.perf_counter()
    out = asyncio.run(sequential())
    assert batcher.waits == 0 and rt.sizes == [1] * 10
    assert [int(r[0]["logits"][0][0]) for r in out] == list(range(10))
    assert time.perf_counter() - t0 < 10 * 0.2  # not one 200 ms wait per request


def test_coming_requests_fill_passes_and_keep_their_rows():
    sizes = {}
    for wait_ms in (0, 20):
        rt = MarkerRuntime(0.005)
        batcher = ContinuousBatcher(Slot(rt), max_batch=64, wait_ms=wait_ms)
        out = asyncio.run(_arrivals(batcher, 80, 0.002))
        for k, res in out:  # each request gets the row computed from its own image
            assert int(res[0]["logits"][0][0]) == k and res[0]["version"] == "v1"
        assert sum(rt.sizes) == 80
        sizes[wait_ms] = float(np.mean(rt.sizes))
        assert (batcher.waits > 0) == (wait_ms > 0)
    assert sizes[20] > 1.5 * sizes[0], sizes


def test_the_wait_ends_when_the_last_coming_request_is_in():
    """A says a backlog is coming (wait_ms 2 s); B arrives 50 ms later saying none: one pass of
    both, long before the wait would have run out."""
    rt = MarkerRuntime(0.001)
    batcher = ContinuousBatcher(Slot(rt), max_batch=64, wait_ms=2000)

    async def pair():
        async def late():
            await asyncio.sleep(0.05)
            return await batcher.submit([job(2)], 0.0, 0)

        try:
            await batcher.submit([job(0)], 0.0, 0)  # a pass of one: the runner is warm
            return await asyncio.gather(batcher.submit([job(1)], 0.0, MIN_COMING), late())
        finally:
            batcher.close()

    t0 = time.perf_counter()
    a, b = asyncio.run(pair())
    assert time.perf_counter() - t0 < 1.0 and rt.sizes == [1, 2] and batcher.waits == 1
    assert (int(a[0]["logits"][0][0]), int(b[0]["logits"][0][0])) == (1, 2)


def test_a_promise_nobody_keeps_costs_wait_ms_once():
    rt = MarkerRuntime(0.0)
    batcher = ContinuousBatcher(Slot(rt), max_batch=64, wait_ms=300)

    async def broken_promise():
        try:
            await batcher.submit([job(0)], 0.0, 0)
            return await batcher.submit([job(1)], 0.0, MIN_COMING)  # says a backlog is coming; none does
        finally:
            batcher.close()

    t0 = time.perf_counter()
    asyncio.run(broken_promise())
    assert 0.25 < time.perf_counter() - t0 < 2.0 and rt.sizes == [1, 1] and batcher.waits == 1


class GatedRuntime(MarkerRuntime):
    """A MarkerRuntime whose passes wait for `gate`: calls queue up behind the first one."""

    def __init__(self):
        super().__init__(0.0)
        self.gate = threading.Event()

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False):
        self.gate.wait(5)
        return super().run_path(path, pixels)


def test_expired_abandoned_and_failing_deliveries_leave_the_runner_serving():
    """submit_nowait (the hop's path): a call past its deadline is answered "timeout" without a pass,
    an abandoned one (its front connection closed) is never computed, a deliver that raises does
    not stop the runner, and the pass listeners run after each pass."""
    rt = GatedRuntime()
    batcher = ContinuousBatcher(Slot(rt), max_batch=64)
    got: dict[str, list] = {}
    done = threading.Event()
    passes: list[int] = []
    batcher.add_pass_listener(lambda: passes.append(len(rt.sizes)))

    def keep(name):
        def deliver(res):
            got[name] = res
            if name == "last":
                done.set()
        return deliver

    def explode(res):
        raise RuntimeError("the front's side failed")

    batcher.submit_nowait([job(0)], 0.0, 0, keep("first"))  # holds the runner until the gate opens
    time.sleep(0.1)
    batcher.submit_nowait([job(1)], time.time() - 1, 0, keep("expired"))
    batcher.submit_nowait([job(2)], 0.0, 0, keep("abandoned"), abandoned=lambda: True)
    batcher.submit_nowait([job(3)], 0.0, 0, explode)
    batcher.submit_nowait([job(4)], 0.0, 0, keep("last"))
    rt.gate.set()
    assert done.wait(5)
    batcher.close()
    assert got["expired"] == [{"error": "timeout"}] and "abandoned" not in got
    assert int(got["first"][0]["logits"][0][0]) == 0 and int(got["last"][0]["logits"][0][0]) == 4
    assert rt.sizes == [1, 2] and passes[-1] == 2  # job 0 alone, then 3 and 4; 1 and 2 never computed


class TwoLaneRuntime(MarkerRuntime):
    """Passes may overlap (`concurrent_passes`, as OnnxRuntime with CLIPHEADS_ORT_PASSES=2): records
    each pass's size, whether it ran `alongside`, and how many passes ran at once."""

    def __init__(self, pass_s: float, concurrent_passes: int):
        super().__init__(pass_s)
        self.concurrent_passes = concurrent_passes
        self.gate = threading.Event()
        self.log: list[tuple[int, bool]] = []
        self._lock = threading.Lock()
        self.now = self.most = 0

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.log.append((len(pixels), alongside))
        try:
            self.gate.wait(5)
            return super().run_path(path, pixels)
        finally:
            with self._lock:
                self.now -= 1


def _backlog_behind_a_lone_pass(rt) -> ContinuousBatcher:
    """Request 0 alone on an idle encoder, held at the gate; 8 more queue behind it; then open."""
    batcher = ContinuousBatcher(Slot(rt), max_batch=64)
    got, done = {}, threading.Event()

    def keep(k):
        def deliver(res):
            got[k] = res
            if len(got) == 9:
                done.set()
        return deliver

    batcher.submit_nowait([job(0)], 0.0, 0, keep(0))
    time.sleep(0.1)
    for k in range(1, 9):
        batcher.submit_nowait([job(k)], 0.0, 0, keep(k))
    rt.gate.set()
    assert done.wait(5)
    batcher.close()
    assert all(int(got[k][0]["logits"][0][0]) == k for k in range(9))  # each request its own row
    return batcher


def test_two_passes_at_once_share_a_backlog_and_a_lone_request_gets_the_whole_runtime():
    rt = TwoLaneRuntime(0.05, concurrent_passes=2)
    assert len(_backlog_behind_a_lone_pass(rt)._runners) == 2
    # the lone request alone and on all threads; its backlog split between the two runners, both
    # passes at once on one thread each
    assert rt.log[0] == (1, False) and sorted(rt.log[1:]) == [(4, True), (4, True)] and rt.most == 2

    one = TwoLaneRuntime(0.05, concurrent_passes=1)  # the default: one pass at a time, all queued
    assert len(_backlog_behind_a_lone_pass(one)._runners) == 1  # no idle second runner to wake
    assert one.log == [(1, False), (8, False)] and one.most == 1
