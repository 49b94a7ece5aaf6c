"""`clipheads score`: batch-score images with a bundle (or head) into sharded Parquet.

    clipheads score BUNDLE|HEAD --input DIR|CSV|PARQUET --output OUT.parquet
        [--tasks a,b] [--top-k 5] [--batch-size 64] [--workers N] [--engine local|ray]
        [--embeddings] [--errors FILE] [--runtime auto|onnx|onnx-cpu|onnx-cuda|torch]
        [--shard-size 4096] [--commit-every 30] [--follow-symlinks] [--threads T] [--overwrite]
        [--json] [--no-progress]

Local engine (one process):

    listing --(names)--> decode pool (N threads: read, ImageRejected checks, resize/crop)
            --(bounded, in order)--> fixed-size uint8 batches --(queue of 2)--> Runtime
            --> per-shard columns --> atomic Parquet part + manifest commit

At most `2 * batch_size` images are in flight in the pool, two full batches wait in the queue, one
is being filled and one is in the runtime: never more than `6 * batch_size` decoded images (384 at
batch 64, 58 MB at 224 px), whatever the input size. Rows keep the listing order. Output layout, resume and
error records: see serving/shards.py. Columns of each `part-*.parquet`:

    index                int64   position of the input in the listing
    path                 string  relative to DIR, or as written in the CSV/Parquet `path` column
    {task}.label         string  top-1 label
    {task}.score         float32 top-1 softmax probability
    {task}.top_labels    list<string>   top-k labels, best first (only when --top-k > 1)
    {task}.top_scores    list<float32>  their probabilities
    embedding            list<float32>  L2-normalized image features (only with --embeddings)

Scores are the softmax of each task's logits, the same numbers the HTTP `/classify` returns
(there rounded to 6 decimals). Batches hold `batch_size` decoded images; only the last batch of
each shard can be smaller (a batch never spans two shards).

Rejected inputs (unreadable, over the byte or pixel cap, not JPEG/PNG/WEBP by their bytes, corrupt)
are not rows: they are listed in the errors file (`--errors`, default `OUT/_errors.jsonl`; CSV
when the name ends in .csv) as {index, path, kind, detail}, `kind` being `serving.images`'
ImageRejected kind (`invalid_image`, `unsupported_format`, `too_many_bytes`, `image_too_large`,
`bad_aspect_ratio`), `unreadable`, or a listing kind: `outside_input` (a link leaving the input
directory, not followed without `--follow-symlinks`), `not_a_file` (a directory named like an
image, a FIFO/socket/device). Every input is either a row or an error record, once.

Commits: a shard (`--shard-size` inputs) commits when it is done, and a piece of it commits as soon
as `--commit-every` seconds (30) passed since the last commit, so a killed job loses at most that
much work even inside a large shard; the next run resumes after the last committed piece.

A run ends with one summary line on stderr (scored, failed, skipped, images/s) and, with
`--json`, the ScoreSummary as JSON on stdout. images/s is counted from the first decode
(start-up excluded); `seconds` is the whole wall time. `--engine ray`: serving/score_ray.py.
Exit codes: 0 ok (also when some images were rejected), 2 bad usage or bad input (missing
bundle/input, unknown task, OUT holds another job or its committed inputs changed), 1 failure,
130 interrupted (committed shards are kept; the same command resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .images import DecodeSpec, ImageRejected, decode_image
from .runtime import RUNTIME_KINDS as RUNTIMES, source_sha256
from .shards import InputError, InputItem, InputListing, OutputConflict, Shard, ShardStore

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 4096


class UsageError(ValueError):
    """Bad arguments or inputs: exit code 2."""


@dataclass(frozen=True)
class ScoreJob:
    """Everything a scoring run needs; the CLI builds one from flags, tests build one directly."""

    source: str  # bundle directory or *.head.safetensors
    input: str  # DIR, CSV or Parquet listing
    output: str  # OUT.parquet directory
    tasks: Optional[tuple[str, ...]] = None  # None: all of the source's tasks
    top_k: int = 5
    batch_size: int = 64
    workers: int = 0  # local: decode threads; ray: scoring actors. 0: from the CPU count / the cluster's slots
    engine: str = "local"
    embeddings: bool = False
    errors: Optional[str] = None  # default OUT/_errors.jsonl
    runtime: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    commit_every_s: float = 30.0  # also commit the work done so far after this long (0: only full shards)
    follow_symlinks: bool = False  # directory inputs: follow links that leave the input directory
    path_column: str = "path"
    overwrite: bool = False
    progress: bool = True
    max_bytes: Optional[int] = None
    max_pixels: Optional[int] = None
    device: Optional[str] = None  # torch runtime device
    runtime_threads: int = 0  # intra-op threads of the runtime (torch / ORT); 0: the library default
    ray_address: Optional[str] = None
    ray_num_gpus: float = 0.0  # per scoring actor
    ray_num_cpus: float = 1.0  # per scoring actor
    ray_decode: str = "actor"  # "actor": each scoring actor decodes its batches; "tasks": a CPU decode stage

    def resolved_workers(self) -> int:
        """Decode threads of the local engine (the Ray engine sizes its actor pool from the cluster)."""
        if self.workers > 0:
            return self.workers
        return max(1, min(8, os.cpu_count() or 1))


@dataclass
class ScoreSummary:
    output: str
    errors_file: str
    engine: str
    runtime: str
    total: int = 0  # inputs in the listing
    scored: int = 0  # rows written by this run
    failed: int = 0  # rejected by this run
    skipped: int = 0  # inputs committed by an earlier run (not rescored)
    shards_committed: int = 0  # parts committed by this run (whole shards, or pieces of one)
    shards_skipped: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    rows_total: int = 0  # rows in the whole output
    errors_total: int = 0
    peak_buffered_images: int = 0  # decoded images alive at once (local engine)
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"scored {self.scored}, failed {self.failed}"
            + (f", skipped {self.skipped} already committed" if self.skipped else "")
            + f" in {self.seconds:.1f}s ({self.images_per_s:.1f} images/s, {self.engine}/{self.runtime})"
            f" -> {self.output} ({self.rows_total} rows, {self.errors_total} errors listed in {self.errors_file})"
        )


# ---- source metadata (no runtime needed) ---------------------------------------------------
def source_info(source: str) -> dict:
    """Tasks, preprocess and a fingerprint of a bundle dir or head file, without opening a runtime."""
    src = Path(source).expanduser()
    if not src.exists():
        raise UsageError(f"no such bundle or head: {src}")
    if src.is_dir():
        from .runtime import RuntimeError_, read_manifest

        try:
            m = read_manifest(src)
        except RuntimeError_ as err:
            raise UsageError(str(err)) from None
        tasks = {t["name"]: list(t["classnames"]) for t in m["tasks"]}
        return {"kind": "bundle", "path": str(src.resolve()), "sha256": source_sha256(src),
                "tasks": tasks, "preprocess": dict(m["preprocess"])}
    from clipheads.training.artifact import ArtifactError, load_head

    try:
        art = load_head(src)
    except (ArtifactError, OSError, ValueError) as err:
        raise UsageError(f"{src}: {err}") from None
    return {"kind": "head", "path": str(src.resolve()), "sha256": source_sha256(src),
            "tasks": {t.name: list(t.classnames) for t in art.tasks}, "preprocess": art.preprocess.to_json()}


def decode_spec(info: dict, job: ScoreJob) -> DecodeSpec:
    return DecodeSpec.from_preprocess(info["preprocess"], max_bytes=job.max_bytes, max_pixels=job.max_pixels)


def load_item(location: str, spec: DecodeSpec) -> np.ndarray:
    """Read one file (never more than the byte cap) and decode it. Raises only ImageRejected."""
    try:
        st = os.stat(location)
        if not os.path.isfile(location):
            raise ImageRejected("unreadable", "not a regular file")
        if st.st_size > spec.max_bytes:
            raise ImageRejected("too_many_bytes", f"file is {st.st_size} bytes; the limit is {spec.max_bytes}", 413)
        with open(location, "rb") as f:
            data = f.read(spec.max_bytes + 1)
    except ImageRejected:
        raise
    except OSError as err:
        raise ImageRejected("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    return decode_image(data, spec)


def set_runtime_threads(n: int) -> None:
    """Intra-op threads for the runtime opened next (0: leave the defaults). On a few cores,
    leaving room for the decode pool avoids OpenMP threads waiting on a descheduled sibling."""
    if n <= 0:
        return
    os.environ["CLIPHEADS_ORT_THREADS"] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


# ---- turning runtime outputs into columns ---------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def run_batch(runtime, pixels: np.ndarray, tasks: Sequence[str], embeddings: bool) -> tuple[dict, Optional[np.ndarray]]:
    """One encoder pass per distinct image path: {task: logits (N, C)}, features (N, E) or None."""
    logits: dict[str, np.ndarray] = {}
    feats = None
    for path, group in runtime.paths_for(tasks).items():
        lg, f = runtime.run_path(path, pixels)
        if embeddings and path == runtime.base_path:
            feats = f
        for t in group:
            a, b = runtime.tasks[t].logit_slice
            logits[t] = lg[:, a:b]
    if embeddings and feats is None:
        feats = runtime.encode_images(pixels)
    if feats is not None:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return logits, feats


class Columns:
    """Accumulates one shard's output columns (top-k of each task) batch by batch."""

    def __init__(self, tasks: dict[str, list[str]], top_k: int, embeddings: bool):
        self.tasks = tasks
        self.top_k = top_k
        self.embeddings = embeddings
        self.cols: dict[str, list] = {}
        self.reset()

    def reset(self) -> None:
        self.cols = {"index": [], "path": []}
        for t in self.tasks:
            self.cols[f"{t}.label"], self.cols[f"{t}.score"] = [], []
            if self.top_k > 1:
                self.cols[f"{t}.top_labels"], self.cols[f"{t}.top_scores"] = [], []
        if self.embeddings:
            self.cols["embedding"] = []

    def add(self, indices: Sequence[int], keys: Sequence[str], logits: dict[str, np.ndarray], feats) -> None:
        self.cols["index"].extend(indices)
        self.cols["path"].extend(keys)
        for t, labels in self.tasks.items():
            probs = softmax(logits[t])
            k = min(self.top_k, probs.shape[1])
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
            top = np.take_along_axis(probs, order, axis=1)
            names = np.asarray(labels, dtype=object)[order]
            self.cols[f"{t}.label"].extend(names[:, 0].tolist())
            self.cols[f"{t}.score"].append(top[:, 0])
            if self.top_k > 1:
                self.cols[f"{t}.top_labels"].extend(names.tolist())
                self.cols[f"{t}.top_scores"].extend(top.tolist())
        if self.embeddings:
            self.cols["embedding"].extend(feats.astype(np.float32).tolist())

    def schema(self):
        import pyarrow as pa

        fields = [pa.field("index", pa.int64()), pa.field("path", pa.string())]
        for t in self.tasks:
            fields += [pa.field(f"{t}.label", pa.string()), pa.field(f"{t}.score", pa.float32())]
            if self.top_k > 1:
                fields += [pa.field(f"{t}.top_labels", pa.list_(pa.string())),
                           pa.field(f"{t}.top_scores", pa.list_(pa.float32()))]
        if self.embeddings:
            fields.append(pa.field("embedding", pa.list_(pa.float32())))
        return pa.schema(fields)

    def table(self):
        import pyarrow as pa

        schema = self.schema()
        arrays = []
        for f in schema:
            v = self.cols[f.name]
            if f.name.endswith(".score"):
                v = np.concatenate(v) if v else np.zeros(0, np.float32)
            arrays.append(pa.array(v, type=f.type))
        return pa.Table.from_arrays(arrays, schema=schema)


# ---- local engine: bounded decode pipeline --------------------------------------------------
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


def _pending_shards(listing: InputListing, job: ScoreJob, store: ShardStore, counts: dict) -> Iterator[Shard]:
    """What the listing's shards still need (committed parts are verified and skipped): whole
    shards, or the rest of a shard an earlier run committed in part."""
    for shard in listing.shards(job.shard_size):
        rest = store.remaining(shard)
        counts["skipped"] += len(shard.items) - (len(rest.items) if rest else 0)
        if rest is None:
            counts["shards_skipped"] += 1
            continue
        yield rest


def _progress(job: ScoreJob, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="scoring", dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr, disable=not job.progress, mininterval=0.5)


def _run_local(job: ScoreJob, info: dict, listing: InputListing, store: ShardStore, total: int,
               summary: ScoreSummary, counts: dict, runtime=None) -> None:
    from .runtime import open_runtime

    if runtime is None:
        set_runtime_threads(job.runtime_threads)
        runtime = open_runtime(job.source, job.runtime, device=job.device)
    summary.runtime = runtime.name
    tasks = {t: info["tasks"][t] for t in _task_names(job, info)}
    cols = Columns(tasks, job.top_k, job.embeddings)
    cols.table()  # pyarrow's first table build initialises lazily (~0.4 s): count it as start-up
    spec = decode_spec(info, job)
    bar = _progress(job, total)
    counts["t_start"] = time.perf_counter()  # images/s excludes start-up (runtime, pyarrow); `seconds` does not
    pipe = DecodePipeline(_pending_shards(listing, job, store, counts), spec, job.batch_size,
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


def _task_names(job: ScoreJob, info: dict) -> list[str]:
    known = list(info["tasks"])
    if not job.tasks:
        return known
    unknown = [t for t in job.tasks if t not in info["tasks"]]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; this source has: {', '.join(known)}")
    return list(dict.fromkeys(job.tasks))


def job_identity(job: ScoreJob, info: dict, listing: InputListing) -> dict:
    return {
        "source": info["path"],
        "source_kind": info["kind"],
        "source_sha256": info["sha256"],
        "tasks": {t: info["tasks"][t] for t in _task_names(job, info)},
        "top_k": job.top_k,
        "embeddings": job.embeddings,
        "shard_size": job.shard_size,
        "input": listing.describe(),
        "preprocess": info["preprocess"],
    }


def validate(job: ScoreJob) -> None:
    if job.engine not in ENGINES:
        raise UsageError(f"unknown engine {job.engine!r}; choose from {', '.join(ENGINES)}")
    if job.runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {job.runtime!r}; choose from {', '.join(RUNTIMES)}")
    for name in ("top_k", "batch_size", "shard_size"):
        if getattr(job, name) < 1:
            raise UsageError(f"{name.replace('_', '-')} must be >= 1")
    if job.ray_decode not in ("actor", "tasks"):
        raise UsageError(f"unknown ray decode mode {job.ray_decode!r}; choose actor or tasks")
    if job.workers < 0 or job.runtime_threads < 0:
        raise UsageError("workers and threads must be >= 0")
    if job.commit_every_s < 0:
        raise UsageError("commit-every must be >= 0 seconds")


def score(job: ScoreJob, runtime=None) -> ScoreSummary:
    """Run (or resume) a scoring job. Raises UsageError / InputError / OutputConflict for bad
    usage or inputs; anything else is a failure. `runtime`: an already open Runtime for
    `job.source` to reuse (local engine only; e.g. the one a service process holds)."""
    validate(job)
    t0 = time.perf_counter()
    info = source_info(job.source)
    out = Path(job.output).expanduser().resolve()
    errors_file = Path(job.errors).expanduser().resolve() if job.errors else out / "_errors.jsonl"
    listing = InputListing(job.input, job.path_column, exclude=[out, errors_file], follow_symlinks=job.follow_symlinks)
    identity = job_identity(job, info, listing)
    if job.engine == "local" and runtime is None:  # a broken bundle fails before OUT is touched
        from .runtime import open_runtime

        set_runtime_threads(job.runtime_threads)
        runtime = open_runtime(job.source, job.runtime, device=job.device)
    store = ShardStore(out, identity, overwrite=job.overwrite)
    total = listing.count()
    summary = ScoreSummary(output=str(out), errors_file=str(errors_file), engine=job.engine, runtime=job.runtime,
                           total=total)
    counts = {"skipped": 0, "shards_skipped": 0}
    t_run = time.perf_counter()
    if job.engine == "local":
        _run_local(job, info, listing, store, total, summary, counts, runtime=runtime)
    else:
        from .score_ray import run_ray

        run_ray(job, info, listing, store, total, summary, counts)
    summary.skipped = counts["skipped"]
    summary.shards_skipped = counts["shards_skipped"]
    done = summary.scored + summary.failed
    summary.seconds = time.perf_counter() - t0
    run_s = time.perf_counter() - counts.get("t_start", t_run)
    summary.extra["startup_s"] = round(counts.get("t_start", t_run) - t0, 3)
    summary.images_per_s = done / run_s if run_s > 0 else 0.0
    summary.errors_total = store.write_errors_file(errors_file)
    summary.rows_total = sum(v["rows"] for v in store.shards.values())
    complete = summary.rows_total + summary.errors_total == total
    store.write_manifest(complete=complete, summary={
        k: v for k, v in asdict(summary).items() if k not in ("extra",)
    } | {"host": platform.node(), "finished": time.time()})
    if not complete:
        raise RuntimeError(f"output has {summary.rows_total} rows + {summary.errors_total} errors for {total} inputs")
    return summary


# ---- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipheads score",
        description="Batch-score images into sharded Parquet (resumable; bad images go to an errors file).",
    )
    p.add_argument("source", help="export bundle directory, or a *.head.safetensors file (eager PyTorch)")
    p.add_argument("--input", required=True, help="image directory (recursive), or a CSV/Parquet with a 'path' column")
    p.add_argument("--output", required=True, help="output directory, e.g. preds.parquet (Parquet parts + _manifest.json)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--top-k", type=int, default=5, help="labels kept per task (default 5; top-1 always has its own columns)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="local: decode threads; ray: scoring actors (default: from CPU count)")
    p.add_argument("--engine", choices=ENGINES, default="local")
    p.add_argument("--embeddings", action="store_true", help="also write L2-normalized image embeddings")
    p.add_argument("--errors", default=None, help="errors file (JSONL, or CSV if it ends in .csv); default OUT/_errors.jsonl")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="inputs per committed Parquet part")
    p.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="also commit the work done so far after this many seconds (default 30; 0: only full shards)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="directory input: follow links that leave the directory (default: listed as outside_input)")
    p.add_argument("--path-column", default="path", help="column of the CSV/Parquet listing that holds image paths")
    p.add_argument("--max-bytes", type=int, default=None, help="per-file byte cap (default 20 MiB)")
    p.add_argument("--max-pixels", type=int, default=None, help="per-image pixel cap read from the header (default 40 MP)")
    p.add_argument("--threads", type=int, default=0, help="runtime intra-op threads (default: the runtime's own)")
    p.add_argument("--device", default=None, help="torch runtime device (cpu, cuda, cuda:1)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output instead of resuming it")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per Ray scoring actor")
    p.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per Ray scoring actor")
    p.add_argument("--ray-decode", choices=("actor", "tasks"), default="actor",
                   help="ray: decode inside the scoring actors, or in a separate CPU task stage (for GPU actors)")
    p.add_argument("--model-configs", default=None, help="extra open_clip model-config directory (custom archs)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")
    return p


def job_from_args(args: argparse.Namespace) -> ScoreJob:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    return ScoreJob(
        source=args.source, input=args.input, output=args.output, tasks=tasks, top_k=args.top_k,
        batch_size=args.batch_size, workers=args.workers, engine=args.engine, embeddings=args.embeddings,
        errors=args.errors, runtime=args.runtime, shard_size=args.shard_size, path_column=args.path_column,
        commit_every_s=args.commit_every, follow_symlinks=args.follow_symlinks,
        overwrite=args.overwrite, progress=not args.no_progress, max_bytes=args.max_bytes,
        max_pixels=args.max_pixels, device=args.device, runtime_threads=args.threads, ray_address=args.ray_address,
        ray_num_gpus=args.ray_num_gpus, ray_num_cpus=args.ray_num_cpus, ray_decode=args.ray_decode,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 for bad usage, 0 for --help
        return int(e.code or 0)
    if args.model_configs:
        os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(Path(args.model_configs).expanduser().resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        summary = score(job_from_args(args))
    except (UsageError, InputError, OutputConflict) as err:
        print(f"clipheads score: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipheads score: interrupted; committed shards are kept, run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - report, exit 1
        from .runtime import RuntimeError_

        if isinstance(err, RuntimeError_):
            print(f"clipheads score: {err}", file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print(f"clipheads score: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"clipheads score: {summary.line()}", file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(summary), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
