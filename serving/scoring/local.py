"""The local engine (one process): a bounded decode pipeline feeding one Runtime, shard by shard.

    listing --(names)--> decode pool (N threads: read, ImageRejected checks, resize/crop)
            --(bounded, in order)--> fixed-size uint8 batches --(queue of 2)--> Runtime
            --> per-shard columns --> atomic Parquet part + manifest commit

At most `2 * batch_size` images are in flight in the pool, two full batches wait in the queue, one
is being filled and one is in the runtime: never more than `6 * batch_size` decoded images (384 at
batch 64, 58 MB at 224 px), whatever the input size. Rows keep the listing order.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from ..images import DecodeSpec, ImageRejected
from ..runtimes import open_runtime
from .columns import Columns, embedding_dim, run_batch
from .job import ScoreJob, ScoreSummary, decode_spec, load_item, pending_shards, progress_bar, set_runtime_threads, task_names
from .listing import InputItem, InputListing, Shard
from .shards import ShardStore


@dataclass
class _Batch:
    indices: list[int]
    keys: list[str]
    pixels: Optional[np.ndarray]  # (n, 3, S, S) uint8, n <= batch_size
    errors: list[dict]


_SHARD_END = object()
_DONE = object()


class DecodePipeline:
    """Producer thread + decode pool -> queue of fixed-size batches, in listing order.

    Memory bound: `max_inflight` decoded images in the pool + `prefetch` full batches in the queue +
    the batch being filled + the batch the consumer is running. `peak` records the most decoded
    images alive at once (tests assert the bound).
    """

    def __init__(self, shards: Iterator[Shard], spec: DecodeSpec, batch_size: int, workers: int,
                 prefetch: int = 2, loader: Callable[[str, DecodeSpec], np.ndarray] = load_item):
        self.spec = spec
        self.batch_size = batch_size
        self.max_inflight = max(2 * batch_size, workers)
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._shards = shards
        self._loader = loader
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score-decode")
        self._stop = threading.Event()
        self._alive = 0
        self._alive_lock = threading.Lock()
        self.peak = 0
        self._thread = threading.Thread(target=self._produce, name="score-producer", daemon=True)

    def _track(self, n: int) -> None:
        with self._alive_lock:
            self._alive += n
            self.peak = max(self.peak, self._alive)

    def _load(self, item: InputItem):
        if item.error is not None:  # rejected by the listing (a link out of the input, a directory): never opened
            return ImageRejected(*item.error)
        try:
            px = self._loader(item.location, self.spec)
        except ImageRejected as err:  # a fresh copy: no traceback/context pinning frames (and bytes) until gc
            return ImageRejected(err.kind, err.detail, err.http_status)
        except Exception as err:  # noqa: BLE001 - a decoder bug must not kill the job
            return ImageRejected("invalid_image", f"{type(err).__name__}: {err}")
        self._track(1)
        return px

    def _put(self, obj) -> None:
        while not self._stop.is_set():
            try:
                self.q.put(obj, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _produce(self) -> None:
        try:
            for shard in self._shards:
                self._put(shard)
                pending: deque = deque()
                batch = _Batch([], [], None, [])
                pix: list[np.ndarray] = []

                def take():
                    nonlocal batch, pix
                    item, fut = pending.popleft()
                    r = fut.result()
                    if isinstance(r, ImageRejected):
                        batch.errors.append({"index": item.index, "path": item.key, "kind": r.kind, "detail": r.detail})
                        return
                    batch.indices.append(item.index)
                    batch.keys.append(item.key)
                    pix.append(r)
                    if len(pix) == self.batch_size:
                        flush()

                def flush():
                    nonlocal batch, pix
                    batch.pixels = np.stack(pix) if pix else None
                    self._put(batch)
                    batch, pix = _Batch([], [], None, []), []

                for item in shard.items:
                    if self._stop.is_set():
                        raise _Stopped
                    pending.append((item, self._pool.submit(self._load, item)))
                    while len(pending) >= self.max_inflight:
                        take()
                while pending:
                    take()
                if pix or batch.errors:
                    flush()
                self._put(_SHARD_END)
            self._put(_DONE)
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            try:
                self._put(err)
            except _Stopped:
                pass

    def __iter__(self):
        self._thread.start()
        try:
            while True:
                obj = self.q.get()
                if obj is _DONE:
                    return
                if isinstance(obj, BaseException):
                    raise obj
                yield obj
                if isinstance(obj, _Batch) and obj.pixels is not None:
                    self._track(-len(obj.pixels))
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    pass


def run_local(job: ScoreJob, info: dict, listing: InputListing, store: ShardStore, total: int,
               summary: ScoreSummary, counts: dict, runtime=None) -> None:
    if runtime is None:
        set_runtime_threads(job.runtime_threads)
        runtime = open_runtime(job.source, job.runtime, device=job.device, weights=job.weights)
    summary.runtime = runtime.name
    if getattr(runtime, "backbone_weights", None):  # a head file: which weights file it used
        summary.extra["backbone"] = runtime.backbone_weights
    tasks = {t: info["tasks"][t] for t in task_names(job, info)}
    cols = Columns(tasks, job.top_k, job.embeddings, embedding_dim(runtime, info) if job.embeddings else 0)
    cols.table()  # pyarrow's first table build initialises lazily (~0.4 s): count it as start-up
    spec = decode_spec(info, job)
    bar = progress_bar(job, total)
    counts["t_start"] = time.perf_counter()  # images/s excludes start-up (runtime, pyarrow); `seconds` does not
    pipe = DecodePipeline(pending_shards(listing, job, store, counts), spec, job.batch_size,
                          job.resolved_workers())
    shard: Optional[Shard] = None
    errors: list[dict] = []
    piece_start = 0  # first input of the shard not committed yet
    last_commit = time.monotonic()
    shown_skipped = 0
    busy = {"runtime_s": 0.0, "write_s": 0.0}

    def commit(stop: int) -> None:
        """Commit the shard's inputs [piece_start, stop): the whole shard, or a piece on time."""
        nonlocal errors, piece_start, last_commit
        if stop <= piece_start:
            return
        t1 = time.perf_counter()
        table = cols.table()
        store.commit(shard.piece(piece_start, stop), table, errors, {"runtime": runtime.name, "engine": "local"})
        busy["write_s"] += time.perf_counter() - t1
        summary.shards_committed += 1
        summary.scored += table.num_rows
        summary.failed += len(errors)
        cols.reset()
        errors, piece_start, last_commit = [], stop, time.monotonic()

    try:
        t_wait = time.perf_counter()
        wait_s = 0.0
        for obj in pipe:
            wait_s += time.perf_counter() - t_wait
            if counts["skipped"] > shown_skipped:  # committed shards count as done
                bar.update(counts["skipped"] - shown_skipped)
                shown_skipped = counts["skipped"]
            if isinstance(obj, Shard):
                shard, errors, piece_start = obj, [], obj.start
                cols.reset()
            elif obj is _SHARD_END:
                commit(shard.stop)
            else:
                if obj.pixels is not None:
                    t1 = time.perf_counter()
                    logits, feats = run_batch(runtime, obj.pixels, list(tasks), job.embeddings)
                    busy["runtime_s"] += time.perf_counter() - t1
                    cols.add(obj.indices, obj.keys, logits, feats)
                errors.extend(obj.errors)
                if obj.errors:
                    bar.set_postfix(failed=summary.failed + len(errors), refresh=False)
                bar.update(len(obj.indices) + len(obj.errors))
                # batches hold consecutive inputs: everything before `done` is scored or rejected
                done = 1 + max(obj.indices[-1] if obj.indices else -1, max((e["index"] for e in obj.errors), default=-1))
                if job.commit_every_s > 0 and time.monotonic() - last_commit >= job.commit_every_s:
                    commit(done)
            t_wait = time.perf_counter()
        if counts["skipped"] > shown_skipped:
            bar.update(counts["skipped"] - shown_skipped)
    finally:
        bar.close()
        summary.peak_buffered_images = pipe.peak
        # where the consumer's time went: waiting on decode (wait_s > 0: decode is the bottleneck)
        summary.extra.update({k: round(v, 3) for k, v in busy.items()})
        summary.extra["wait_for_decode_s"] = round(locals().get("wait_s", 0.0), 3)
