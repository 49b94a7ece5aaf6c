"""The encoder in the front's own process (`CLIPHEADS_ENCODER=inline`, `clipheads serve --encoder inline`).

The default server is two processes, the front and the encoder, joined by the hop (hop.py): the
front's answers survive a crashed runtime (503, then a restarted encoder), and several fronts can
share one model. One front on a small machine pays for that split twice per request (a frame
written and read, a process woken on each side). Inline, the front holds the `EncoderCore` and
hands its requests straight to the batcher: the runner thread delivers each request's rows as
ready-made outputs and wakes the event loop once per pass for all of them.

`InlineHop` has `HopClient`'s interface and `InlineEncoder` the encoder client's (`to_async.*`),
so the front's code (front/core.py) is the same in both layouts.
"""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Optional

import numpy as np

from .encoder.core import EncoderCore
from .hop import EncoderUnavailable

PATH = "inline"  # what `hop.path` and the encoder's ping say in this layout


def outputs(results: list[dict], paths: list[int]) -> tuple[str, Optional[list], dict]:
    """The batcher's per-image results -> (head version, per-image error kinds or None,
    {path: {"logits": (N, C), "features": (N, E)}}): what HopClient.encode returns."""
    versions = {str(r.get("version", "")) for r in results}
    if len(versions) != 1 or any("error" in r for r in results):  # one request, one pass: never a mix
        return "", [r.get("error", "internal") for r in results], {}
    return versions.pop(), None, {p: {"logits": np.stack([r["logits"][p] for r in results]),
                                      "features": np.stack([r["features"][p] for r in results])} for p in paths}


class InlineHop:
    """The front's encode calls onto its own process's batcher."""

    path = PATH

    def __init__(self, core: EncoderCore) -> None:
        self.core = core
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._done: list[tuple[asyncio.Future, tuple]] = []  # delivered in this pass, not yet settled
        self._lock = threading.Lock()
        self._in_flight = 0
        core.batcher.add_pass_listener(self._wake)

    @property
    def in_flight(self) -> int:
        """encode calls handed to the batcher and not yet answered."""
        return self._in_flight

    def point_to(self, path: str) -> None:
        """Nothing to follow: this encoder lives and dies with the front."""

    async def encode(self, pixels: np.ndarray, paths: list[int], deadline: float,
                     timeout: Optional[float] = None, coming: int = 0) -> tuple[str, Optional[list], dict]:
        loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        paths = [int(p) for p in paths]

        def deliver(results: list) -> None:  # on the runner thread: the outputs are built there
            with self._lock:
                self._done.append((fut, outputs(results, paths)))

        jobs = [{"paths": paths, "pixels": px} for px in pixels]
        self._in_flight += 1
        try:
            self.core.batcher.submit_nowait(jobs, deadline, coming, deliver, abandoned=fut.done)
        except RuntimeError as err:  # the batcher closed: the server is shutting down
            self._in_flight -= 1
            raise EncoderUnavailable(str(err)) from err
        try:
            return await (asyncio.wait_for(fut, timeout) if timeout else fut)
        finally:
            self._in_flight -= 1

    def _wake(self) -> None:
        """After every pass (runner thread): one wake-up of the loop settles all its answers."""
        with self._lock:
            done, self._done = self._done, []
        if done and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_settle_all, done)

    async def close(self) -> None:
        self.core.close()


def _settle_all(done: list[tuple[asyncio.Future, tuple]]) -> None:
    for fut, out in done:
        if not fut.done():  # a caller that timed out or was cancelled is gone
            fut.set_result(out)


class InlineEncoder:
    """The encoder client's calls (`enc.to_async.<name>`) on the in-process core; the blocking
    ones (a text pass, a reload) run in the loop's executor."""

    def __init__(self, core: EncoderCore) -> None:
        self.core = core

    @property
    def to_async(self) -> "InlineEncoder":
        return self

    async def info(self) -> dict:
        return self.core.info(PATH)

    async def ping(self, front_pid: int = 0) -> dict:
        return {"pid": os.getpid(), "error": self.core.error, "hop": PATH}

    async def encode(self, jobs: list, deadline: float = 0.0) -> list:
        return await self.core.batcher.submit(jobs, deadline)

    async def encode_texts(self, texts: list[str]) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.core.encode_texts, texts)

    async def reload(self, source: str) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.core.reload, source)

    async def check(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.core.check)
