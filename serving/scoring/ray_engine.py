"""`clipheads score --engine ray`: the same scoring on Ray Data, same output and errors file.

    listing (driver, names only) -> ray.data.from_arrow(blocks of batch_size names)
        [-> map_batches(decode_batch) as CPU tasks, with --ray-decode tasks (GPU actors)]
        -> map_batches(RayScorer, ActorPoolStrategy(size=workers), num_cpus/num_gpus per actor)
           (each actor opens the Runtime once; with the default --ray-decode actor it reads +
            decodes its batch in a thread pool of its CPU share with serving.images; it runs the
            encoder and returns predictions or error records, one row per input)
        -> driver iterates the results in input order (preserve_order) and commits each shard
           with the same ShardStore as the local engine.

Only shards not committed yet are sent to the cluster. The image files must be readable at the
same paths from every Ray node (shared or object-store-mounted filesystem). The pending names are
held on the driver (about 100 B per input). `ray.init` is called only if Ray is not initialised:
`--ray-address` / RAY_ADDRESS for a cluster, else a local instance without the dashboard.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from ..images import ImageRejected
from ..runtimes import open_runtime
from .columns import Columns, embedding_dim, run_batch
from .job import ScoreJob, ScoreSummary, UsageError, decode_spec, load_item, pending_shards, progress_bar, task_names
from .listing import InputListing, Shard
from .shards import ShardStore

ERROR_KIND = "_error_kind"
ERROR_DETAIL = "_error_detail"
LISTING_KIND = "listing_error_kind"
LISTING_DETAIL = "listing_error_detail"
RUNTIME = "_runtime"  # the actor's real runtime name (e.g. onnx-cpu), recorded per part and in the summary


def decode_batch(batch, info: dict, max_bytes: Optional[int], max_pixels: Optional[int], threads: int = 1) -> dict:
    """The optional CPU decode stage (`ray_decode="tasks"`, run as Ray tasks): names -> uint8
    pixels + error columns, so GPU actors only run the encoder."""
    spec = decode_spec(info, ScoreJob(source="", input="", output="", max_bytes=max_bytes, max_pixels=max_pixels))
    locs = batch.column("location").to_pylist()
    listed = _listing_errors(batch)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda a: _safe_load(a[0], spec, a[1]), zip(locs, listed)))
    s = spec.image_size
    pixels = np.zeros((len(locs), 3, s, s), np.uint8)
    kinds, details = [], []
    for i, r in enumerate(results):
        if isinstance(r, ImageRejected):
            kinds.append(r.kind)
            details.append(r.detail)
        else:
            pixels[i] = r
            kinds.append("")
            details.append("")
    return {"index": batch.column("index").to_numpy(), "path": np.asarray(batch.column("path").to_pylist(), object),
            "pixels": pixels, ERROR_KIND: np.asarray(kinds, object), ERROR_DETAIL: np.asarray(details, object)}


def _listing_errors(batch) -> list:
    """Per row: the listing's (kind, detail) rejection, or None (the file is to be read)."""
    kinds = batch.column(LISTING_KIND).to_pylist()
    details = batch.column(LISTING_DETAIL).to_pylist()
    return [(k, d) if k else None for k, d in zip(kinds, details)]


def _safe_load(loc: str, spec, listing_error=None):
    if listing_error is not None:  # a link out of the input directory, a directory: never opened
        return ImageRejected(*listing_error)
    try:
        return load_item(loc, spec)
    except ImageRejected as err:  # a fresh copy: no traceback pinning frames
        return ImageRejected(err.kind, err.detail, err.http_status)
    except Exception as err:  # noqa: BLE001 - a decoder bug rejects one image, not the job
        return ImageRejected("invalid_image", f"{type(err).__name__}: {err}")


class RayScorer:
    """A stateful Ray Data actor: one Runtime per actor (CPU or GPU slot). Takes either names
    (decodes them itself, in a thread pool of its CPU share) or batches from `decode_batch`."""

    def __init__(self, source: str, runtime: str, device: Optional[str], tasks: dict, top_k: int, embeddings: bool,
                 info: dict, max_bytes: Optional[int], max_pixels: Optional[int], env: dict, decode_threads: int,
                 weights: Optional[str] = None):
        os.environ.update(env)
        threads = max(1, decode_threads)  # = the actor's CPU share: one slot, no oversubscription
        os.environ.setdefault("CLIPHEADS_ORT_THREADS", str(threads))
        if runtime in ("auto", "torch", "torch-folded"):
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                pass
        self.runtime = open_runtime(source, runtime, device=device, weights=weights)
        self.tasks = tasks
        self.embeddings = embeddings
        self.cols = Columns(tasks, top_k, embeddings, embedding_dim(self.runtime, info) if embeddings else 0)
        job = ScoreJob(source=source, input="", output="", max_bytes=max_bytes, max_pixels=max_pixels)
        self.spec = decode_spec(info, job)
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="ray-decode")

    def _load(self, loc: str):
        return _safe_load(loc, self.spec)

    def __call__(self, batch):
        import pyarrow as pa

        if isinstance(batch, dict):  # from decode_batch (numpy batch format)
            index = batch["index"].tolist()
            keys = [str(k) for k in batch["path"]]
            kinds = batch[ERROR_KIND]
            results = [ImageRejected(str(k), str(d)) if k else None for k, d in zip(kinds, batch[ERROR_DETAIL])]
            ok = [i for i, r in enumerate(results) if r is None]
            pixels = batch["pixels"][ok] if ok else None
        else:  # names: decode here
            index = batch.column("index").to_pylist()
            keys = batch.column("path").to_pylist()
            results = list(self.pool.map(lambda a: _safe_load(a[0], self.spec, a[1]),
                                         zip(batch.column("location").to_pylist(), _listing_errors(batch))))
            ok = [i for i, r in enumerate(results) if not isinstance(r, ImageRejected)]
            pixels = np.stack([results[i] for i in ok]) if ok else None
        bad = [i for i, r in enumerate(results) if isinstance(r, ImageRejected)]
        self.cols.reset()
        if ok:
            logits, feats = run_batch(self.runtime, pixels, list(self.tasks), self.embeddings)
            self.cols.add([index[i] for i in ok], [keys[i] for i in ok], logits, feats)
        scored = self.cols.table()
        scored = scored.append_column(ERROR_KIND, pa.nulls(len(ok), pa.string()))
        scored = scored.append_column(ERROR_DETAIL, pa.nulls(len(ok), pa.string()))
        scored = scored.append_column(RUNTIME, pa.array([self.runtime.name] * len(ok), pa.string()))
        schema = scored.schema
        arrays = []
        for f in schema:
            if f.name == "index":
                arrays.append(pa.array([index[i] for i in bad], pa.int64()))
            elif f.name == "path":
                arrays.append(pa.array([keys[i] for i in bad], pa.string()))
            elif f.name == ERROR_KIND:
                arrays.append(pa.array([results[i].kind for i in bad], pa.string()))
            elif f.name == ERROR_DETAIL:
                arrays.append(pa.array([results[i].detail for i in bad], pa.string()))
            elif f.name == RUNTIME:
                arrays.append(pa.array([self.runtime.name] * len(bad), pa.string()))
            else:
                arrays.append(pa.nulls(len(bad), f.type))
        errors = pa.Table.from_arrays(arrays, schema=schema)
        return pa.concat_tables([scored, errors]).sort_by("index")


def _default_workers(job: ScoreJob) -> int:
    """As many scoring actors as the cluster has slots: GPUs / num_gpus per actor, or CPUs /
    num_cpus per actor (one CPU left to the decode stage with ray_decode="tasks")."""
    import ray

    res = ray.cluster_resources()
    if job.ray_num_gpus > 0:
        return max(1, int(res.get("GPU", 0) / job.ray_num_gpus))
    cpus = float(res.get("CPU", 1)) - (1 if job.ray_decode == "tasks" else 0)
    return max(1, int(cpus / max(job.ray_num_cpus, 0.01)))


def _init_ray(job: ScoreJob) -> bool:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = job.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    return True


def run_ray(job: ScoreJob, info: dict, listing: InputListing, store: ShardStore, total: int,
            summary: ScoreSummary, counts: dict) -> None:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise UsageError(f"--engine ray needs Ray Data: pip install -r requirements/ray.txt ({err})") from None
    import pyarrow as pa
    import pyarrow.compute as pc

    tasks = {t: info["tasks"][t] for t in task_names(job, info)}
    pending: list[Shard] = list(pending_shards(listing, job, store, counts))
    summary.runtime = f"ray:{job.runtime}"  # until the actors say which runtime they opened
    runtimes: set = set()
    bar = progress_bar(job, total)
    bar.update(counts["skipped"])
    if not pending:
        bar.close()
        return
    started = _init_ray(job)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in input order: shards commit in order
        ctx.enable_progress_bars = False
        blocks = []
        for shard in pending:
            for a in range(0, len(shard.items), job.batch_size):
                chunk = shard.items[a:a + job.batch_size]
                blocks.append(pa.table({
                    "index": pa.array([it.index for it in chunk], pa.int64()),
                    "path": pa.array([it.key for it in chunk], pa.string()),
                    "location": pa.array([it.location for it in chunk], pa.string()),
                    LISTING_KIND: pa.array([it.error[0] if it.error else None for it in chunk], pa.string()),
                    LISTING_DETAIL: pa.array([it.error[1] if it.error else None for it in chunk], pa.string()),
                }))
        env = {k: v for k, v in os.environ.items() if k.startswith("CLIPHEADS_") or k == "HF_HUB_OFFLINE"}
        workers = job.workers if job.workers > 0 else _default_workers(job)
        summary.extra["ray_workers"] = workers
        ds = ray.data.from_arrow(blocks)
        decode_stage = job.ray_decode == "tasks"
        if decode_stage:  # CPU tasks decode, actors only encode (the GPU-cluster layout)
            ds = ds.map_batches(
                decode_batch, fn_kwargs=dict(info=info, max_bytes=job.max_bytes, max_pixels=job.max_pixels),
                batch_size=job.batch_size, batch_format="pyarrow", num_cpus=1,
            )  # with GPU actors the stages stay apart; with CPU-only actors of 1 CPU (equal remote args)
            # Ray's optimizer fuses them into the actors, which is what --ray-decode actor does anyway
        ds = ds.map_batches(
            RayScorer,
            fn_constructor_kwargs=dict(
                source=info["path"], runtime=job.runtime, device=job.device, tasks=tasks, top_k=job.top_k,
                embeddings=job.embeddings, info=info, max_bytes=job.max_bytes, max_pixels=job.max_pixels,
                env=env, decode_threads=max(1, int(job.ray_num_cpus)), weights=job.weights,
            ),
            batch_size=job.batch_size,
            batch_format="numpy" if decode_stage else "pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),  # one Runtime per actor, fixed pool
            num_cpus=job.ray_num_cpus,
            num_gpus=job.ray_num_gpus or None,
        )
        by_id = {s.id: s for s in pending}
        cur: Optional[int] = None
        pieces: list = []
        piece_start = {s.id: s.start for s in pending}  # first input of each shard not committed yet
        last_commit = time.monotonic()

        def commit(sid: int, stop: Optional[int] = None) -> None:
            """Commit shard `sid`'s inputs [piece_start, stop) (default: to its end)."""
            nonlocal pieces, last_commit
            t = pa.concat_tables(pieces) if pieces else None
            pieces = []
            shard = by_id[sid].piece(piece_start[sid], by_id[sid].stop if stop is None else stop)
            piece_start[sid] = shard.stop
            last_commit = time.monotonic()
            if not shard.items:
                return
            if t is None or t.num_rows != len(shard.items) or t.column("index").to_pylist() != [it.index for it in shard.items]:
                raise RuntimeError(f"ray returned {0 if t is None else t.num_rows} rows for shard {sid} of {len(shard.items)} inputs")
            names = sorted(set(t.column(RUNTIME).to_pylist()))
            runtimes.update(names)
            summary.runtime = "ray:" + ",".join(sorted(runtimes))
            failed = pc.is_valid(t.column(ERROR_KIND))
            errs = t.filter(failed)
            errors = [{"index": i, "path": p, "kind": k, "detail": d} for i, p, k, d in zip(
                errs.column("index").to_pylist(), errs.column("path").to_pylist(),
                errs.column(ERROR_KIND).to_pylist(), errs.column(ERROR_DETAIL).to_pylist())]
            scored = t.filter(pc.invert(failed)).drop_columns([ERROR_KIND, ERROR_DETAIL, RUNTIME])
            store.commit(shard, scored, errors, {"runtime": ",".join(names), "engine": "ray"})
            summary.shards_committed += 1
            summary.scored += scored.num_rows
            summary.failed += len(errors)

        counts["t_start"] = time.perf_counter()  # actor start-up is inside the timed part for ray
        first: Optional[tuple[float, int]] = None
        seen = 0
        for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if out.num_rows == 0:
                continue
            idx = out.column("index").to_numpy()
            sids = idx // job.shard_size  # shard = fixed slice: id = index // shard_size
            for sid in np.unique(sids):
                part = out.filter(pa.array(sids == sid))
                if cur is not None and sid != cur:
                    commit(cur)
                cur = int(sid)
                pieces.append(part)
            if cur is not None and job.commit_every_s > 0 and time.monotonic() - last_commit >= job.commit_every_s:
                commit(cur, int(idx.max()) + 1)  # rows come in input order: all before it are here
            bar.update(out.num_rows)
            seen += out.num_rows
            if first is None:  # actors are up and the first batch is through
                first = (time.perf_counter(), out.num_rows)
        if cur is not None:
            commit(cur)
        if first is not None:
            t_end = time.perf_counter()
            summary.extra["first_batch_s"] = round(first[0] - counts["t_start"], 3)
            if t_end > first[0] and seen > first[1]:
                summary.extra["steady_images_per_s"] = round((seen - first[1]) / (t_end - first[0]), 2)
        missing = [s.id for s in pending if store.remaining(s) is not None]
        if missing:
            raise RuntimeError(f"ray engine finished without results for shards {missing[:10]}")
    finally:
        bar.close()
        if started:
            ray.shutdown()
