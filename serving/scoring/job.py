"""The batch-scoring job model shared by both engines: what a job is (`ScoreJob`), what it reports
(`ScoreSummary`), what its source holds (`source_info`) and how inputs are read (`load_item`).
The engines (`local.py`, `ray_engine.py`) and the output store (`shards.py`) build on it.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..images import DecodeSpec, ImageRejected, decode_image
from ..runtimes import RUNTIME_KINDS as RUNTIMES, source_sha256
from .listing import InputListing, Shard
from .shards import ERRORS_DIR, LOCK, MANIFEST, ShardStore

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 4096
MAX_CAP = 2**63 - 1  # --max-bytes / --max-pixels: an int64 (what a read size and JSON readers hold)
READ_CHUNK = 1 << 20


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
    weights: Optional[str] = None  # a head file's backbone weights if they moved (sha256-checked)
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
        from ..runtimes import RuntimeError_, read_manifest

        try:
            m = read_manifest(src)
        except RuntimeError_ as err:
            raise UsageError(str(err)) from None
        tasks = {t["name"]: list(t["classnames"]) for t in m["tasks"]}
        sha = source_sha256(src)
        heads = [{k: h[k] for k in ("file", "method", "tasks") if k in h} for h in m.get("heads") or []]
        return {"kind": "bundle", "path": str(src.resolve()), "sha256": sha, "version": sha[:12],
                "tasks": tasks, "preprocess": dict(m["preprocess"]), "heads": heads,
                "embed_dim": (m.get("backbone") or {}).get("embed_dim"),
                "backbone": _backbone_summary(m.get("backbone") or {})}
    from clipheads.training.artifact import ArtifactError, load_head

    try:
        art = load_head(src)
    except (ArtifactError, OSError, ValueError) as err:
        raise UsageError(f"{src}: {err}") from None
    sha = source_sha256(src)
    return {"kind": "head", "path": str(src.resolve()), "sha256": sha, "version": sha[:12],
            "tasks": {t.name: list(t.classnames) for t in art.tasks}, "preprocess": art.preprocess.to_json(),
            "heads": [{"file": str(src.resolve()), "method": art.method, "tasks": [t.name for t in art.tasks],
                       "sha256": sha, "version": sha[:12]}],
            "embed_dim": art.backbone.get("embed_dim"), "backbone": _backbone_summary(art.backbone)}


def _backbone_summary(record: dict) -> dict:
    return {k: record[k] for k in ("arch", "pretrained", "weights_sha256", "act") if k in record}


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
            # the file's size, not the cap: a read allocates its whole size up front (a huge cap
            # would fail every image with MemoryError); +1 sees a file that grew since the stat
            want = min(st.st_size, spec.max_bytes) + 1
            data = f.read(want)
            if len(data) == want and want <= spec.max_bytes:  # it grew: read on, never past the cap + 1
                chunks = [data]
                n = len(data)
                while n <= spec.max_bytes:
                    more = f.read(min(READ_CHUNK, spec.max_bytes + 1 - n))
                    if not more:
                        break
                    chunks.append(more)
                    n += len(more)
                data = b"".join(chunks)
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


def task_names(job: ScoreJob, info: dict) -> list[str]:
    """The tasks scored, always in the source's order whatever the order of `job.tasks`: the job's
    identity is the set of tasks, and the `predictions` struct of every part has one field order."""
    known = list(info["tasks"])
    if not job.tasks:
        return known
    unknown = [t for t in job.tasks if t not in info["tasks"]]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; this source has: {', '.join(known)}")
    return [t for t in known if t in set(job.tasks)]


def job_identity(job: ScoreJob, info: dict, listing: InputListing) -> dict:
    spec = decode_spec(info, job)
    return {
        "source": info["path"],
        "source_kind": info["kind"],
        "source_sha256": info["sha256"],
        "source_version": info["version"],  # what POST /classify answers as head_version
        "heads": info["heads"],
        "backbone": info["backbone"],
        "tasks": {t: info["tasks"][t] for t in task_names(job, info)},
        "top_k": job.top_k,
        "embeddings": job.embeddings,
        "shard_size": job.shard_size,
        "input": listing.describe(),
        "preprocess": info["preprocess"],
        # the effective caps (defaults filled in): they decide which inputs are errors
        "max_bytes": spec.max_bytes,
        "max_pixels": spec.max_pixels,
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
    if not job.commit_every_s >= 0:  # also NaN (every comparison with it is false)
        raise UsageError("commit-every must be >= 0 seconds")
    for name in ("max_bytes", "max_pixels"):  # 0 or less would reject every image
        v = getattr(job, name)
        if v is not None and v < 1:
            raise UsageError(f"{name.replace('_', '-')} must be >= 1")
        if v is not None and v > MAX_CAP:
            raise UsageError(f"{name.replace('_', '-')} must be <= {MAX_CAP}")
    if not (job.ray_num_gpus >= 0 and math.isfinite(job.ray_num_gpus)):
        raise UsageError("ray-num-gpus must be >= 0")
    if not (job.ray_num_cpus > 0 and math.isfinite(job.ray_num_cpus)):  # 0 would size the pool as if actors were free
        raise UsageError("ray-num-cpus must be > 0")


def with_resolved_source(job: ScoreJob) -> ScoreJob:
    """`job` with its source as a path: a model-store tag (NAME[:VERSION], as `clipheads serve`
    takes) becomes the stored bundle or head; an existing path stays as it is."""
    from ..model_store import ModelStoreError, resolve_source

    try:
        return replace(job, source=str(resolve_source(job.source)))
    except ModelStoreError as err:
        raise UsageError(f"no such bundle or head: {err}") from None


def check_output_paths(out: Path, errors_file: Path) -> None:
    """Refuse, before any work, an --output or --errors that cannot be written: the errors file
    is a directory, or a parent of either is an existing file; or an errors file inside OUT that
    readers of OUT as a Parquet dataset would not skip (its name must start with '_', directly
    in OUT) or that is one of OUT's own files."""
    if errors_file.is_dir():
        raise UsageError(f"--errors {errors_file} is a directory; give a file name (.jsonl or .csv)")
    if errors_file == out or out in errors_file.parents:
        rel = errors_file.relative_to(out) if errors_file != out else Path(".")
        if errors_file.parent != out or not rel.name.startswith("_"):
            raise UsageError(
                f"--errors {errors_file} is inside the output {out}: there it must be a file directly in it "
                f"whose name starts with '_' (e.g. {out / '_errors.csv'}), which readers of the output as a "
                "Parquet dataset skip (and --overwrite knows as ours); or put it outside the output")
        if rel.name in (MANIFEST, LOCK, ERRORS_DIR):
            raise UsageError(f"--errors {errors_file} is one of the output's own files; choose another name")
    for what, path in (("--output", out), ("--errors", errors_file)):
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UsageError(f"{what} {path}: {parent} is not a directory")
                break


def pending_shards(listing: InputListing, job: ScoreJob, store: ShardStore, counts: dict) -> Iterator[Shard]:
    """What the listing's shards still need (committed parts are verified and skipped): whole
    shards, or the rest of a shard an earlier run committed in part. `counts["listed"]`: the
    inputs this walk saw (the listing can change after `listing.count()`)."""
    counts["listed"] = 0
    for shard in listing.shards(job.shard_size):
        counts["listed"] = shard.stop
        rest = store.remaining(shard)
        counts["skipped"] += len(shard.items) - (len(rest.items) if rest else 0)
        if rest is None:
            counts["shards_skipped"] += 1
            continue
        yield rest


def progress_bar(job: ScoreJob, total: int):
    """Drawn only when `job.progress` and stderr is a terminal (a redirected run writes no `\\r` frames)."""
    from clipheads.training.console import progress

    return progress(total=total, enabled=job.progress, file=sys.stderr, unit="img", desc="scoring",
                    dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
