"""`clipheads score` command line: flags -> ScoreJob -> score(); exit codes 0/1/2/130 (see run.py)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from clipheads.training import console

from ..runtimes import RUNTIME_KINDS as RUNTIMES, RuntimeError_
from .job import DEFAULT_SHARD_SIZE, ENGINES, ScoreJob, UsageError
from .run import score
from .listing import InputError
from .shards import OutputConflict


BAD_INPUT = (UsageError, InputError, OutputConflict, RuntimeError_)


def build_parser() -> argparse.ArgumentParser:
    p = console.ArgumentParser(
        prog="clipheads score",
        description="Batch-score images into sharded Parquet (resumable; bad images go to an errors file).",
    )
    p.add_argument("source", help="export bundle directory, a *.head.safetensors file (eager PyTorch), or the tag "
                   "(NAME[:VERSION]) of one saved with `clipheads models save`")
    p.add_argument("--input", required=True, help="image directory (recursive), or a CSV/Parquet with a 'path' column")
    p.add_argument("--output", required=True, help="output directory, e.g. preds.parquet (Parquet parts + _manifest.json)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all; written in the source's order)")
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
    p.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                   help="a head file's backbone weights if they moved (path, tag or hf-hub id; sha256-checked)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output instead of resuming it")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per Ray scoring actor")
    p.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per Ray scoring actor")
    p.add_argument("--ray-decode", choices=("actor", "tasks"), default="actor",
                   help="ray: decode inside the scoring actors, or in a separate CPU task stage (for GPU actors)")
    p.add_argument("--model-configs", default=None, help="extra open_clip model-config directory (custom archs)")
    console.add_output_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal anyway)")
    return p


def job_from_args(args: argparse.Namespace) -> ScoreJob:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    return ScoreJob(
        source=args.source, input=args.input, output=args.output, tasks=tasks, top_k=args.top_k,
        batch_size=args.batch_size, workers=args.workers, engine=args.engine, embeddings=args.embeddings,
        errors=args.errors, runtime=args.runtime, shard_size=args.shard_size, path_column=args.path_column,
        commit_every_s=args.commit_every, follow_symlinks=args.follow_symlinks,
        overwrite=args.overwrite, progress=not (args.no_progress or args.quiet), max_bytes=args.max_bytes,
        max_pixels=args.max_pixels, device=args.device, weights=args.pretrained, runtime_threads=args.threads, ray_address=args.ray_address,
        ray_num_gpus=args.ray_num_gpus, ray_num_cpus=args.ray_num_cpus, ray_decode=args.ray_decode,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, code = console.parse(build_parser(), argv)
    if args is None:
        return code
    if args.model_configs:
        os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(Path(args.model_configs).expanduser().resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def run() -> int:
        try:
            summary = score(job_from_args(args))
        except KeyboardInterrupt:
            print("clipheads score: interrupted; committed shards are kept, run the same command to resume",
                  file=sys.stderr)
            return console.EXIT_INTERRUPTED
        except BAD_INPUT:
            raise
        except Exception as err:  # noqa: BLE001 - a failure, not bad input: traceback, exit 1
            import traceback

            traceback.print_exc()
            print(f"clipheads score: failed: {type(err).__name__}: {err}", file=sys.stderr)
            return console.EXIT_FAIL
        changed = summary.extra.get("listing_changed")
        if changed:  # a warning, not --quiet's to hide
            print(f"clipheads score: warning: the input changed while it was scored ({changed['counted']} inputs "
                  f"counted at the start, {changed['listed']} listed by the scoring pass); the output holds what "
                  "the scoring pass listed, and a rerun may find the committed inputs changed", file=sys.stderr)
        if summary.extra.get("backbone"):
            console.info(f"clipheads score: backbone: {summary.extra['backbone']}", args.quiet)
        console.info(f"clipheads score: {summary.line()}", args.quiet)
        console.emit(asdict(summary), args.json)
        return console.EXIT_OK

    # bad usage or input (a broken bundle or head included): one line, exit 2; anything else keeps its traceback
    return console.run("clipheads score", run, BAD_INPUT, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
