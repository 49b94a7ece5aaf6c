"""Continuous batching for the encoder: requests queue, one runner takes everything queued.

Instead of BentoML's adaptive batching, whose latency model sheds queued requests with 503s when
one pass takes seconds on a CPU: requests queue here; one runner thread takes everything queued (up
to `max_batch` images) as soon as the previous pass ends, so the batch grows with the load and an
idle server adds no wait. When the front says a backlog of its requests is on its way (`coming`,
sent with each request: admitted there, not yet here; at least MIN_COMING), a pass waits up to
`wait_ms` for them and stops as soon as the latest arrival says fewer are left: fewer, larger passes
cost less CPU per image when the cores are saturated, while a lone client or a few never wait (their
pass overlaps the front's decoding of the next request; bench/serving/results/README.md). One runtime pass per distinct path; if it raises, each image is retried
alone, so a failure fails only the request(s) that cause it. Work whose front request already timed
out (its `deadline` passed) is skipped.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

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


class ContinuousBatcher:
    """jobs: one per image of ONE request, {"paths": [int], "pixels": (3, S, S) uint8} -> per image
    {"logits": {path: (C_path,)}, "features": {path: (E,)}, "version"} or {"error": kind, "version"}."""

    def __init__(self, slot: HeadSlot, max_batch: int = 64, wait_ms: int = 0):
        self.slot = slot
        self.max_batch = max(1, max_batch)
        self.wait_ms = wait_ms
        self.coming = 0  # the latest arrival's count of the front's requests still on their way
        self.waits = 0  # passes that waited for coming requests
        self._queue: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._runner: Optional[asyncio.Future] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")

    async def submit(self, jobs: list[Any], deadline: float = 0.0, coming: int = 0) -> list[Any]:
        """`deadline` (epoch seconds, 0 = none): the front has given up after it; the pass skips it.
        `coming`: the front's other requests admitted but not yet sent here (0: none, or unknown)."""
        loop = asyncio.get_running_loop()
        self.coming = max(0, int(coming))
        fut = loop.create_future()
        self._queue.append((jobs, float(deadline or 0.0), fut))
        ENCODER_QUEUE.inc(len(jobs))
        self._wake.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run_batches())
        return await fut

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=False)

    def _queued(self) -> int:
        return sum(len(jobs) for jobs, _, _ in self._queue)

    async def _gather(self, cap: int) -> None:
        """Wait up to `wait_ms` while the latest arrival says requests are still on their way."""
        if self.wait_ms <= 0 or self.coming < MIN_COMING or self._queued() >= cap:
            return
        self.waits += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_ms / 1000
        while self.coming > 0 and self._queued() < cap:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        cap = self.max_batch
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather(cap)
            take, n, now = [], 0, time.time()
            while self._queue and (n == 0 or n + len(self._queue[0][0]) <= cap):
                jobs, deadline, fut = self._queue.popleft()
                ENCODER_QUEUE.dec(len(jobs))
                if fut.done():
                    continue
                if deadline and now > deadline:  # the front already answered 504: skip the work
                    fut.set_result([{"error": "timeout"}] * len(jobs))
                    continue
                take.append((jobs, fut))
                n += len(jobs)
            if not take:
                continue
            flat = [j for jobs, _ in take for j in jobs]
            ENCODER_BATCH.observe(len(flat))
            head = self.slot.current  # one version for the whole pass (a swap lands between passes)
            try:
                res = await loop.run_in_executor(self._pool, encode_isolated, head.runtime, flat)
            except Exception:  # noqa: BLE001 - never let the runner die
                log.exception("encoder pass failed")
                res = [{"error": "internal"}] * len(flat)
            for r in res:
                r.setdefault("version", head.version)
            i = 0
            for jobs, fut in take:
                if not fut.done():
                    fut.set_result(res[i:i + len(jobs)])
                i += len(jobs)


def encode_isolated(runtime: Runtime, jobs: list[Any]) -> list[Any]:
    """One batched pass; if it raises, each job alone, so only the failing job(s) get an error."""
    try:
        return encode_batch(runtime, jobs)
    except Exception:  # noqa: BLE001 - isolate: find the failing image(s)
        if len(jobs) == 1:
            log.exception("runtime failure")
            return [{"error": "internal"}]
        log.warning("batched pass over %d images failed; retrying them one by one", len(jobs))
        out: list[Any] = []
        for job in jobs:
            try:
                out.extend(encode_batch(runtime, [job]))
            except Exception:  # noqa: BLE001
                log.exception("runtime failure")
                out.append({"error": "internal"})
        return out


def encode_batch(runtime: Runtime, jobs: list[Any]) -> list[Any]:
    """One runtime pass per distinct path over the jobs that need it; non-finite outputs raise."""
    out: list[Any] = [{"logits": {}, "features": {}} for _ in jobs]
    by_path: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        for p in job["paths"]:
            by_path.setdefault(int(p), []).append(i)
    for p, idx in by_path.items():
        pixels = np.stack([jobs[i]["pixels"] for i in idx])
        logits, feats = runtime.run_path(p, pixels)
        if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
            raise FloatingPointError(f"non-finite outputs on path {p}")
        for j, i in enumerate(idx):
            out[i]["logits"][p] = logits[j]
            out[i]["features"][p] = feats[j]
    return out
