"""`StoreCalls`: the few-shot task store's calls, off the front's event loop and bounded in time.

A store call may wait on a database (tasks/postgres.py). Run on the event loop, a stalled or
partitioned database would freeze every request of the front, bundle tasks and /livez included;
here each call runs in a small pool of its own threads (never the decode threads) and the
request gets 503 `tasks_store_unavailable` after `timeout_s`. On a timeout the store is asked
to `interrupt()` the stuck call (the PostgreSQL store shuts its connection's socket, so the
thread gets an error instead of waiting for TCP to give up, and the next call reconnects).

A write that times out may still commit: the client was told to retry, and the retry answers 409
`task_exists` (or succeeds with `replace`). Stores that never block (memory) are called inline.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

from ..tasks import TaskStore, TaskStoreError

T = TypeVar("T")


class StoreCalls:
    def __init__(self, timeout_s: float, workers: int = 2):
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tasks-store")
        self._opening: Optional[asyncio.Future] = None

    def unavailable(self, what: str = "the task store") -> TaskStoreError:
        return TaskStoreError("tasks_store_unavailable",
                              f"{what} did not answer within {self.timeout_s:g} s; retry shortly", 503)

    async def run(self, fn: Callable[..., T], *args, store: Optional[TaskStore] = None, **kw) -> T:
        """`fn(*args, **kw)` in the store's threads within `timeout_s`; `store`, when given, is
        interrupted on a timeout and called inline when it never blocks."""
        if store is not None and not store.may_block:
            return fn(*args, **kw)
        future = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kw))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            if store is not None:
                store.interrupt()
            raise self.unavailable() from None

    async def open(self, opener: Callable[[], TaskStore]) -> TaskStore:
        """The store `opener()` makes, in the store's threads, within `timeout_s`. An attempt that
        times out keeps going, and the next call waits for it rather than starting another (a
        database that hangs costs one thread, not one per readiness probe)."""
        if self._opening is None:
            self._opening = asyncio.get_running_loop().run_in_executor(self._pool, opener)
        attempt = self._opening
        try:
            return await asyncio.wait_for(asyncio.shield(attempt), self.timeout_s)
        except asyncio.TimeoutError:
            raise self.unavailable("opening the task store") from None
        finally:
            if attempt.done():
                self._opening = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
