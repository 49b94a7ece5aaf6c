"""Issue 17.5: a ViT-B/16 head served end to end over HTTP with the PyTorch CUDA runtime.

    python bench/gpu/serve_cuda.py [--arch ViT-B-16] [--concurrency 64] [--images-per-request 1 8] \
        [--front-workers 1 8] [--duration 20] [--out DIR]

1. writes a zero-shot head on a random-init `--arch` (speed only; labels mean nothing);
2. raw: that head's runtime in this process (`open_runtime(head, "auto")`: folded fp16 + CUDA graphs
   on a GPU), pre-decoded pixels, batch 32, no HTTP, measured before and after the served levels;
3. starts `clipheads serve HEAD` (the real BentoML front + encoder) and drives POST /classify with
   the lean keep-alive load generator of bench/serving/overhead.py (one process, ~0.2 ms of CPU per
   request) at `--concurrency`, with 1 and 8 JPEGs (320x240) per request, once per `--front-workers`
   count (one front is one Python event loop doing HTTP and decode: on a 16-core GPU machine it, not
   the GPU, is expected to be the limit for 1-image requests);
4. writes OUT/serve-cuda.json and OUT/serve-cuda.md: images/s, p50/p99, errors, the encoder's mean
   batch and served/raw, with the machine and versions.

Runs on a CPU too (`--arch test-vit-micro`: the script's own dry run; the runtime is then
torch-cpu), which is how it is checked before a GPU session spends device time on it.
bench/gpu/serve_cuda.sh is the one command for the lent GPU machine (wheels carried in .whl/).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "serving"))
from load_test import Raw, batch_stats, jpeg, make_head  # noqa: E402
from overhead import drive, start_server, stop_server  # noqa: E402


def versions() -> dict:
    import bentoml
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "bentoml": bentoml.__version__,
           "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64])
    ap.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--front-workers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "gpu"))
    args = ap.parse_args(argv)
    os.environ.setdefault("CLIPHEADS_MODEL_CONFIGS", str(REPO / "tests" / "model_configs"))
    work = Path(tempfile.mkdtemp(prefix="clipheads-serve-cuda-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    head = make_head(args.arch, work)
    print(f"head written in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    blobs = [jpeg(i) for i in range(64)]
    raw = Raw(str(head), "auto", blobs)
    raw_ips = [raw.model_ips(5.0)]
    print(f"raw {raw.rt.name}: {raw_ips[0]:.1f} images/s", file=sys.stderr, flush=True)
    result = {"arch": args.arch, "runtime": raw.rt.name, "versions": versions(), "rows": [],
              "request": "POST /classify, JPEG 320x240, all tasks, keep-alive connections",
              "raw": "same runtime in the load generator's process, pre-decoded pixels, batch 32, no HTTP"}

    def write() -> None:
        (out / "serve-cuda.json").write_text(json.dumps(result, indent=1))
        v = result["versions"]
        md = [f"# {args.arch} served over HTTP with the {result['runtime']} runtime (issue 17.5)", "",
              f"Machine: {v.get('gpu', 'no GPU')}, {v['cpus']} CPUs; python {v['python']}, torch {v['torch']} "
              f"(CUDA {v['cuda']}), bentoml {v['bentoml']}. Random-init weights (speed only).",
              f"Request: {result['request']}. Raw: {result['raw']}: {result.get('raw_images_per_s')} images/s "
              "(before, after).", "",
              "| front workers | concurrency | images/request | images/s | served/raw | p50 ms | p99 ms "
              "| mean encoder batch | errors |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["rows"]:
            md.append(f"| {r['front_workers']} | {r['concurrency']} | {r['images_per_request']} | {r['images_per_s']} | "
                      f"{r['served_over_raw']:.0%} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_encoder_batch']} | "
                      f"{r['errors'] or '-'} |")
        (out / "serve-cuda.md").write_text("\n".join(md) + "\n")

    for fronts in args.front_workers:
        env = {"CLIPHEADS_FRONT_WORKERS": str(fronts)}
        if fronts > 1:  # several fronts need a shared task store
            env["CLIPHEADS_TASKS_STORE"] = str(work / f"tasks-{fronts}")
        proc, port = start_server(str(head), None, work, env)
        url = f"http://127.0.0.1:{port}"
        try:
            for k in args.images_per_request:
                for c in args.concurrency:
                    asyncio.run(drive(port, blobs, c, 3.0, k))  # warm: every batch size the load reaches
                    b0 = batch_stats(url)
                    r = asyncio.run(drive(port, blobs, c, args.duration, k))
                    b1 = batch_stats(url)
                    r["front_workers"] = fronts
                    r["mean_encoder_batch"] = round((b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]), 1)
                    r["served_over_raw"] = round(r["images_per_s"] / raw_ips[0], 3)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    result["rows"].append(r)
                    write()
        finally:
            stop_server(proc)
    raw_ips.append(raw.model_ips(5.0))
    result["raw_images_per_s"] = [round(x, 1) for x in raw_ips]
    for r in result["rows"]:  # against the mean of the raw runs around the served levels
        r["served_over_raw"] = round(r["images_per_s"] / (sum(raw_ips) / 2), 3)
    write()
    print((out / "serve-cuda.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
