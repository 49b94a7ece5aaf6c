"""`score(job)`: batch-score images with a bundle (or head) into sharded Parquet.

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
error records: see shards.py. Columns of each `part-*.parquet` (no dots in any name):

    index        int64   position of the input in the listing
    path         string  relative to DIR, or as written in the CSV/Parquet `path` column
    predictions  struct: one field per task, each struct<label string (top-1), score float32 (its
                 softmax probability), top_labels fixed_size_list<string, k>, top_scores
                 fixed_size_list<float32, k> (best first; only when --top-k > 1)>, k = min(top-k, classes)
    embedding    fixed_size_list<float32, E>  L2-normalized image features (only with --embeddings)

Every part's Parquet key-value metadata holds, under `clipheads`, JSON with the column meanings and
the provenance of its rows: source kind/path/sha256/version (the `head_version` HTTP answers), its
heads (file, method, tasks), backbone, tasks and labels, top_k, preprocessing, the runtime that
really ran (`onnx-cpu`, `torch-cpu`, ... also for Ray actors), the engine and the inputs it covers.

Scores are the softmax of each task's logits, the same numbers the HTTP `/classify` returns
(there rounded to 6 decimals). Batches hold `batch_size` decoded images; only the last batch of
each shard can be smaller (a batch never spans two shards).

Rejected inputs (unreadable, over the byte or pixel cap, not JPEG/PNG/WEBP by their bytes, corrupt)
are not rows: they are listed in the errors file (`--errors`, default `OUT/_errors.jsonl`; CSV
when the name ends in .csv) as {index, path, kind, detail}, `kind` being `serving.images`'
ImageRejected kind (`invalid_image`, `unsupported_format`, `too_many_bytes`, `image_too_large`,
`bad_aspect_ratio`), `unreadable`, or a listing kind: `outside_input` (a link leaving the input
directory, not followed without `--follow-symlinks`), `not_a_file` (a directory named like an
image, a FIFO/socket/device), `bad_name` (a file name that is not UTF-8; its `path` shows the bad
bytes as `\\xNN`), `unreadable` also for a subdirectory that cannot be listed (its `path` ends in
`/`; its files are unknown). Every input is either a row or an error record, once. Tasks are always
written in the source's order (`--tasks b,a` is the same job as `--tasks a,b`).

Commits: a shard (`--shard-size` inputs) commits when it is done, and a piece of it commits as soon
as `--commit-every` seconds (30) passed since the last commit, so a killed job loses at most that
much work even inside a large shard; the next run resumes after the last committed piece.

A run ends with one summary line on stderr (scored, failed, skipped, images/s) and, with
`--json`, the ScoreSummary as JSON on stdout. images/s is counted from the first decode
(start-up excluded); `seconds` is the whole wall time. `--engine ray`: ray_engine.py.
Exit codes: 0 ok (also when some images were rejected), 2 bad usage or bad input (missing
bundle/input, unknown task, OUT holds another job or its committed inputs changed, another job is
writing OUT), 1 failure, 130 interrupted (committed shards are kept; the same command resumes).

One job writes OUT at a time (an flock on `OUT/_lock`). The byte and pixel caps are part of the
job: a rerun with other caps is another job (refused; --overwrite). Files added to or removed from
an input directory while it is scored are not a failure: the output holds what the scoring pass
listed, `total` is that count, and `extra.listing_changed` ({counted, listed}) says so.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path

from ..runtimes import open_runtime
from .job import (ScoreJob, ScoreSummary, check_output_paths, job_identity, set_runtime_threads, source_info, validate,
                  with_resolved_source)
from .local import run_local
from .ray_engine import run_ray
from .listing import InputListing
from .shards import ERRORS_FILE, ShardStore


def score(job: ScoreJob, runtime=None) -> ScoreSummary:
    """Run (or resume) a scoring job. Raises UsageError / InputError / OutputConflict for bad
    usage or inputs; anything else is a failure. `runtime`: an already open Runtime for
    `job.source` to reuse (local engine only; e.g. the one a service process holds)."""
    validate(job)
    job = with_resolved_source(job)
    t0 = time.perf_counter()
    info = source_info(job.source)
    out = Path(job.output).expanduser().resolve()
    errors_file = Path(job.errors).expanduser().resolve() if job.errors else out / ERRORS_FILE
    check_output_paths(out, errors_file)  # where nothing can be written: refused before any work
    listing = InputListing(job.input, job.path_column, exclude=[out, errors_file], follow_symlinks=job.follow_symlinks)
    identity = job_identity(job, info, listing)
    if job.engine == "local" and runtime is None:  # a broken bundle fails before OUT is touched
        set_runtime_threads(job.runtime_threads)
        runtime = open_runtime(job.source, job.runtime, device=job.device, weights=job.weights)
    total = listing.count()  # reads every input name: a bad listing fails before OUT is touched too
    with ShardStore(out, identity, overwrite=job.overwrite, errors_file=errors_file) as store:  # OUT locked
        store.check_listing(total)  # committed parts past the end of the listing: its inputs changed
        return _run(job, info, listing, store, total, errors_file, runtime, t0)


def _run(job: ScoreJob, info: dict, listing: InputListing, store: ShardStore, total: int, errors_file: Path,
         runtime, t0: float) -> ScoreSummary:
    summary = ScoreSummary(output=str(store.root), errors_file=str(errors_file), engine=job.engine,
                           runtime=job.runtime, total=total)
    counts = {"skipped": 0, "shards_skipped": 0}
    t_run = time.perf_counter()
    if job.engine == "local":
        run_local(job, info, listing, store, total, summary, counts, runtime=runtime)
    else:
        run_ray(job, info, listing, store, total, summary, counts)
    summary.skipped = counts["skipped"]
    summary.shards_skipped = counts["shards_skipped"]
    listed = counts.get("listed", total)  # what the scoring walk saw: files can come and go after count()
    if listed != total:
        summary.total = listed
        summary.extra["listing_changed"] = {"counted": total, "listed": listed}
    done = summary.scored + summary.failed
    summary.seconds = time.perf_counter() - t0
    run_s = time.perf_counter() - counts.get("t_start", t_run)
    summary.extra["startup_s"] = round(counts.get("t_start", t_run) - t0, 3)
    summary.images_per_s = done / run_s if run_s > 0 else 0.0
    summary.errors_total = store.write_errors_file(errors_file)
    summary.rows_total = sum(v["rows"] for v in store.shards.values())
    complete = summary.rows_total + summary.errors_total == listed
    store.write_manifest(complete=complete, summary={
        k: v for k, v in asdict(summary).items() if k not in ("extra",)
    } | {"host": platform.node(), "finished": time.time()})
    if listed != total:
        store.check_listing(listed)  # committed parts past the end of what the walk saw
    if not complete:
        raise RuntimeError(f"output has {summary.rows_total} rows + {summary.errors_total} errors for {listed} inputs")
    return summary
