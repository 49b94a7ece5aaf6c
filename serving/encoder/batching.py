"""Continuous batching for the encoder: requests queue, a runner takes everything queued.

Instead of BentoML's adaptive batching, whose latency model sheds queued requests with 503s when
one pass takes seconds on a CPU: requests queue here; a runner thread takes everything queued (up
to `max_batch` images) as soon as the previous pass ends, so the batch grows with the load and an
idle server adds no wait. When the front says a backlog of its requests is on its way (`coming`,
sent with each request: admitted there, not yet here; at least MIN_COMING), a pass waits up to
`wait_ms` for them and stops as soon as the latest arrival says fewer are left: fewer, larger passes
cost less CPU per image when the cores are saturated, while a lone client or a few never wait (their
pass overlaps the front's decoding of the next request; bench/serving/results/README.md). One
runtime pass per distinct path; if it raises, each image is retried alone, so a failure fails only
the request(s) that cause it. Work whose front request already timed out (its `deadline` passed)
is answered "timeout" without a pass; work nobody waits for any more (`abandoned`) is skipped.

Where the runtime allows two passes at once (`concurrent_passes` 2: ONNX Runtime on two CPU cores
with `CLIPHEADS_ORT_PASSES=2`), the second runner shares a backlog: each takes half and runs it on
one thread, with no join between ops; a lone request on an idle encoder still gets every thread.
(A pass shorter than a thread's wake-up, ~1 ms, can end before the other runner starts; its runner
then halves the rest again. Real models' passes take tens of milliseconds.)
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..metrics import ENCODER_BATCH, ENCODER_QUEUE
from ..runtimes import Runtime
from .heads import HeadSlot

log = logging.getLogger("clipheads.serving")

# Wait for coming requests only when at least this many are on their way: a backlog at the front
# means the cores are saturated and fewer, larger passes save CPU; with one or two coming, the pass
# is better run at once, overlapping the front's decode of the next request (the tiny CLIP at c=2:
# waiting for the one coming request cost 28% of its img/s).
MIN_COMING = 4

Deliver = Callable[[list], None]  # called on the runner thread with one request's per-image results


@dataclass(slots=True)
class _Call:
    jobs: list
    deadline: float  # epoch seconds, 0 = none
    deliver: Deliver
    abandoned: Callable[[], bool]  # True: nobody waits for the answer any more (skip the work)


def _never() -> bool:
    return False


def _settle(fut: asyncio.Future, res: list) -> None:
    if not fut.done():
        fut.set_result(res)


class ContinuousBatcher:
    """jobs: one per image of ONE request, {"paths": [int], "pixels": (3, S, S) uint8} -> per image
    {"logits": {path: (C_path,)}, "features": {path: (E,)}, "version"} or {"error": kind, "version"}.

    The queue and the runner are plain threads, no event loop: the hop (hop.py) reads frames on
    its own threads and hands them in with `submit_nowait`; the runner runs the pass, delivers
    each request's rows and then tells the pass listeners (the hop writes all answers of the pass
    at once). asyncio's tasks, futures and executor wake-ups for each request cost the encoder
    about as much CPU as the tiny model itself (profile tiny-c32-amd-uvloop). `submit` is the same
    for coroutines (BentoML's `encode` route)."""

    def __init__(self, slot: HeadSlot, max_batch: int = 64, wait_ms: int = 0):
        self.slot = slot
        self.max_batch = max(1, max_batch)
        self.wait_ms = wait_ms
        self.coming = 0  # the latest arrival's count of the front's requests still on their way
        self.waits = 0  # passes that waited for coming requests
        self._queue: collections.deque[_Call] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._runners: list[threading.Thread] = []
        self._running = 0  # passes in flight
        self._wide_running = False  # a pass on all of the runtime's threads is in flight: no second one
        self._gathering = False  # one runner waits for coming requests; the other does not start meanwhile
        self._pass_listeners: list[Callable[[], None]] = []

    def add_pass_listener(self, listener: Callable[[], None]) -> None:
        """`listener()` runs on the runner thread after every pass has delivered its results."""
        self._pass_listeners.append(listener)

    def submit_nowait(self, jobs: list[Any], deadline: float, coming: int, deliver: Deliver,
                      abandoned: Callable[[], bool] = _never) -> None:
        """Queue one request; `deliver(results)` runs on the runner thread. `deadline` (epoch
        seconds, 0 = none): the front has given up after it, the pass skips it. `coming`: the
        front's other requests admitted but not yet sent here (0: none, or unknown)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the encoder's batcher is closed")
            self.coming = max(0, int(coming))
            self._queue.append(_Call(jobs, float(deadline or 0.0), deliver, abandoned))
            ENCODER_QUEUE.inc(len(jobs))
            # one runner per pass the runtime may run at once, started on first need: an idle second
            # runner would be woken by every arrival for nothing
            while len(self._runners) < self._concurrent_passes():
                t = threading.Thread(target=self._run_batches, name=f"encoder-{len(self._runners)}", daemon=True)
                self._runners.append(t)
                t.start()
            # all: a runner waiting in _gather must hear every arrival, not just the idle runner
            self._cond.notify_all()

    async def submit(self, jobs: list[Any], deadline: float = 0.0, coming: int = 0) -> list[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.submit_nowait(jobs, deadline, coming, lambda res: loop.call_soon_threadsafe(_settle, fut, res),
                           abandoned=fut.done)  # a cancelled caller's work is skipped
        return await fut

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _queued(self) -> int:
        return sum(len(c.jobs) for c in self._queue)

    def _gather(self, cap: int) -> None:
        """(lock held) Wait up to `wait_ms` while the latest arrival says requests are still on their way."""
        if self.wait_ms <= 0 or self.coming < MIN_COMING or self._queued() >= cap:
            return
        self.waits += 1
        deadline = time.monotonic() + self.wait_ms / 1000
        while self.coming > 0 and self._queued() < cap and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)  # every arrival notifies: it may say that none are left

    def _take(self, cap: int) -> tuple[list[_Call], list[_Call]]:
        """(lock held) -> (everything queued up to `cap` images, calls past their deadline);
        abandoned calls are dropped."""
        take, expired, n, now = [], [], 0, time.time()
        while self._queue and (n == 0 or n + len(self._queue[0].jobs) <= cap):
            call = self._queue.popleft()
            ENCODER_QUEUE.dec(len(call.jobs))
            if call.abandoned():
                continue
            if call.deadline and now > call.deadline:  # the front already answered 504: skip the work
                expired.append(call)
                continue
            take.append(call)
            n += len(call.jobs)
        return take, expired

    def _concurrent_passes(self) -> int:
        head = self.slot.current
        return max(1, int(getattr(head.runtime, "concurrent_passes", 1))) if head is not None else 1

    def _may_take(self) -> bool:
        """(lock held) Work is queued and this runner may start a pass now."""
        if not self._queue or self._gathering:
            return False
        return self._running == 0 or (not self._wide_running and self._running < self._concurrent_passes())

    def _run_batches(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._may_take():
                    self._cond.wait()
                if self._closed:
                    return
                self._gathering = True
                try:
                    self._gather(self.max_batch)
                finally:
                    self._gathering = False
                cap, alongside = self.max_batch, False
                if self._concurrent_passes() > 1:
                    # Passes may overlap (CLIPHEADS_ORT_PASSES=2): with another pass in flight, or a
                    # backlog to share with the idle runner (half each, no join between them), this
                    # pass runs on one thread; a lone request on an idle encoder gets all of them.
                    if self._running:
                        alongside = True
                    elif len(self._queue) > 1:
                        cap, alongside = max(1, (self._queued() + 1) // 2), True
                take, expired = self._take(cap)
                self._running += 1
                self._wide_running = not alongside
                if self._queue:
                    self._cond.notify()  # the rest is the other runner's
            try:
                for call in expired:  # callbacks run outside the lock: arrivals never wait on them
                    self._deliver(call, [{"error": "timeout"}] * len(call.jobs))
                if take:
                    self._run_pass(take, alongside)
            finally:
                with self._cond:
                    self._running -= 1
                    if not alongside:
                        self._wide_running = False
                    self._cond.notify_all()
            for listener in self._pass_listeners:
                try:
                    listener()
                except Exception:  # noqa: BLE001 - never let the runner die
                    log.exception("encoder pass listener failed")

    def _run_pass(self, take: list[_Call], alongside: bool = False) -> None:
        flat = [j for c in take for j in c.jobs]
        ENCODER_BATCH.observe(len(flat))
        head = self.slot.current  # one version for the whole pass (a swap lands between passes)
        try:
            res = encode_isolated(head.runtime, flat, alongside)
        except Exception:  # noqa: BLE001 - never let the runner die
            log.exception("encoder pass failed")
            res = [{"error": "internal"}] * len(flat)
        for r in res:
            r.setdefault("version", head.version)
        i = 0
        for call in take:
            self._deliver(call, res[i:i + len(call.jobs)])
            i += len(call.jobs)

    @staticmethod
    def _deliver(call: _Call, res: list) -> None:
        try:
            call.deliver(res)
        except Exception:  # noqa: BLE001 - one caller's failure is not the pass's
            log.exception("delivering an encoder result failed")


def encode_isolated(runtime: Runtime, jobs: list[Any], alongside: bool = False) -> list[Any]:
    """One batched pass; if it raises, each job alone, so only the failing job(s) get an error."""
    try:
        return encode_batch(runtime, jobs, alongside)
    except Exception:  # noqa: BLE001 - isolate: find the failing image(s)
        if len(jobs) == 1:
            log.exception("runtime failure")
            return [{"error": "internal"}]
        log.warning("batched pass over %d images failed; retrying them one by one", len(jobs))
        out: list[Any] = []
        for job in jobs:
            try:
                out.extend(encode_batch(runtime, [job], alongside))
            except Exception:  # noqa: BLE001
                log.exception("runtime failure")
                out.append({"error": "internal"})
        return out


def encode_batch(runtime: Runtime, jobs: list[Any], alongside: bool = False) -> list[Any]:
    """One runtime pass per distinct path over the jobs that need it; non-finite outputs raise.
    `alongside`: another pass runs at the same time (the runtime then uses one thread)."""
    out: list[Any] = [{"logits": {}, "features": {}} for _ in jobs]
    by_path: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        for p in job["paths"]:
            by_path.setdefault(int(p), []).append(i)
    for p, idx in by_path.items():
        pixels = np.stack([jobs[i]["pixels"] for i in idx])
        logits, feats = runtime.run_path(p, pixels, alongside=alongside)
        if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
            raise FloatingPointError(f"non-finite outputs on path {p}")
        for j, i in enumerate(idx):
            out[i]["logits"][p] = logits[j]
            out[i]["features"][p] = feats[j]
    return out
