"""Batch-scoring throughput: local engine vs the raw runtime, and Ray Data scaling 1 -> 2 workers.

    .venv/bin/python bench/score/bench_score.py [--models vit-b-32,micro] [--images 512] [--out bench/score]

For each model (random weights: speed does not depend on them):
  raw     the Runtime on pre-decoded uint8 batches of 64 (serving.scoring.columns.run_batch, the same call
          the engine makes), i.e. the ceiling;
  local   `score()` on JPEG files (decode pool + runtime), batch 64: target >= 90 % of raw;
  ray-1 / ray-2  `score(engine="ray")` with 1 and 2 scoring actors on a local Ray instance
          (ray.init(num_cpus=2)); timed from the start of dataset execution (actor start-up included).
Writes results.json and RESULTS.md (machine details, load average before/after as a contention note).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODELS = {  # name -> (open_clip arch, extra model-config dir or None)
    "vit-b-32": ("ViT-B-32", None),
    "micro": ("test-vit-micro", REPO / "tests" / "model_configs"),
}
TASKS = {"shape": ("circle", "square", "triangle", "star", "ring"), "color": ("red", "green", "blue", "yellow")}


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import ray

        ray_v = ray.__version__
    except ImportError:
        ray_v = None
    return {
        "cpu": cpu, "cpus_visible": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "ray": ray_v, "platform": platform.platform(),
        "loadavg_before": os.getloadavg(),
    }


def make_head(arch: str, configs: Path | None, d: Path) -> Path:
    import open_clip

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    if configs is not None:
        os.environ["CLIPHEADS_MODEL_CONFIGS"] = str(configs)
        open_clip.add_model_config(configs)
    bb = load_backbone(arch, "none")
    head = build_method("zeroshot", bb, [TaskSpec(n, c) for n, c in TASKS.items()], {})
    return save_head(head, d / f"{arch}.head.safetensors")


def make_bundle(head: Path, d: Path) -> Path:
    """Export the head with the real exporter (fp32 ONNX, ORT fusions, parity-gated)."""
    from clipheads.export.heads import load_heads
    from clipheads.export.pipeline import ExportOptions, export_heads

    heads, meta, pre = load_heads([str(head)])
    res = export_heads(heads, d / (head.name.split(".")[0] + ".bundle"), ExportOptions(probes=8, text=False), meta, pre)
    if not res.passed or res.bundle is None:
        raise SystemExit(f"export parity gate failed: {res.parity.get('failures')}")
    return Path(res.bundle)


def make_images(d: Path, n: int) -> None:
    """Photo-like JPEGs (smooth gradients + noise), 320x240 and 240x320, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        t = ((xx + yy * rng.uniform(0.2, 2)) / 560.0)[..., None]
        arr = (c0 * (1 - t) + c1 * t + rng.normal(0, 12, (240, 320, 3))).clip(0, 255).astype(np.uint8)
        if i % 2:
            arr = arr.transpose(1, 0, 2)
        Image.fromarray(arr).save(d / f"img{i:05d}.jpg", quality=90)


def bench_raw(rt, images: Path, batch: int, repeats: int = 2) -> dict:
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.scoring.columns import run_batch

    spec = DecodeSpec.from_preprocess(rt.preprocess)
    t0 = time.perf_counter()
    px = np.stack([decode_image(p.read_bytes(), spec) for p in sorted(images.iterdir())])
    decode_s = time.perf_counter() - t0
    run_batch(rt, px[:batch], list(rt.tasks), False)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in range(0, len(px), batch):
            run_batch(rt, px[a:a + batch], list(rt.tasks), False)
        best = max(best, len(px) / (time.perf_counter() - t0))
    return {"images_per_s": best, "decode_only_images_per_s_1_thread": len(px) / decode_s, "n": len(px)}


def bench_engine(head: Path, images: Path, out: Path, batch: int, engine: str, workers: int, runtime=None,
                 kind: str = "torch") -> dict:
    from clipheads.serving.scoring import ScoreJob, score

    if out.exists():
        shutil.rmtree(out)
    s = score(ScoreJob(source=str(head), input=str(images), output=str(out), batch_size=batch, workers=workers,
                       engine=engine, runtime=kind, progress=False, shard_size=1024), runtime=runtime)
    return {"images_per_s": s.images_per_s, "seconds": s.seconds, "scored": s.scored,
            "peak_buffered_images": s.peak_buffered_images, **s.extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit-b-32,micro")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved raw/local rounds (medians reported)")
    ap.add_argument("--runtime", choices=("onnx-cpu", "torch"), default="onnx-cpu",
                    help="onnx-cpu: export each head with export/ and score the bundle (the production path)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--render", action="store_true", help="only re-render RESULTS.md from results.json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads((Path(args.out) / "results.json").read_text())
        (Path(args.out) / "RESULTS.md").write_text(markdown(res))
        print((Path(args.out) / "RESULTS.md").read_text())
        return 0
    res = {"machine": machine(), "batch_size": args.batch_size, "images": args.images, "rounds": args.rounds,
           "decode_workers": args.decode_workers, "runtime": args.runtime, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        imgs = work / "images"
        make_images(imgs, args.images)
        for name in args.models.split(","):
            arch, cfg = MODELS[name]
            head = make_head(arch, cfg, work)
            kind = args.runtime
            if kind == "onnx-cpu":
                print(f"[{name}] exporting an ONNX bundle ...", file=sys.stderr)
                head = make_bundle(head, work)
            r: dict = {"arch": arch, "runtime": args.runtime}
            from clipheads.serving.runtimes import open_runtime

            rt = open_runtime(head, kind)  # one warm runtime for raw and local: same weights, same state
            raws, locs = [], []
            for rnd in range(args.rounds):  # interleaved rounds: colleagues' load drifts over minutes
                print(f"[{name}] round {rnd + 1}/{args.rounds}: raw runtime, local engine ...", file=sys.stderr)
                raws.append(bench_raw(rt, imgs, args.batch_size, repeats=1))
                locs.append(bench_engine(head, imgs, work / "local.parquet", args.batch_size, "local",
                                         args.decode_workers, runtime=rt, kind=kind))
            r["raw_rounds"] = [x["images_per_s"] for x in raws]
            r["local_rounds"] = [x["images_per_s"] for x in locs]
            r["raw"] = {"images_per_s": float(np.median(r["raw_rounds"])),
                        "decode_only_images_per_s_1_thread": raws[0]["decode_only_images_per_s_1_thread"]}
            r["local"] = {**locs[-1], "images_per_s": float(np.median(r["local_rounds"]))}
            r["local_vs_raw"] = r["local"]["images_per_s"] / r["raw"]["images_per_s"]
            r["local_vs_raw_per_round"] = [a / b for a, b in zip(r["local_rounds"], r["raw_rounds"])]
            del rt
            if not args.no_ray:
                try:
                    import ray
                except ImportError:
                    r["ray"] = "ray not installed"
                else:
                    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
                    try:
                        for w in (1, 2):
                            print(f"[{name}] ray engine, {w} worker(s) ...", file=sys.stderr)
                            r[f"ray_{w}"] = bench_engine(head, imgs, work / f"ray{w}.parquet", args.batch_size, "ray", w,
                                                         kind=kind)
                    finally:
                        ray.shutdown()
                    r["ray_scaling_2_over_1"] = r["ray_2"]["images_per_s"] / r["ray_1"]["images_per_s"]
                    if r["ray_1"].get("steady_images_per_s") and r["ray_2"].get("steady_images_per_s"):
                        r["ray_steady_scaling_2_over_1"] = (r["ray_2"]["steady_images_per_s"]
                                                            / r["ray_1"]["steady_images_per_s"])
            res["models"][name] = r
            print(json.dumps(r, indent=1), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["machine"]["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "RESULTS.md").write_text(markdown(res))
    print((out / "RESULTS.md").read_text())
    return 0


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Batch scoring throughput", "",
        f"Machine: {m['cpu']}, {m['affinity']} CPU(s) usable, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, Ray {m['ray']}. Load average before/after: "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_before'])} / {', '.join(f'{x:.2f}' for x in m['loadavg_after'])} "
        "(the 2 cores are shared with colleagues' jobs: numbers are noisy and pessimistic).", "",
        f"{res['images']} JPEG images 320x240 (photo-like), batch {res['batch_size']}, runtime {res['runtime']} "
        "(random weights; onnx-cpu = the head exported by export/ to an fp32 ONNX bundle), zero-shot head with 2 tasks, "
        f"{res['decode_workers']} decode threads. `raw` = the runtime on pre-decoded uint8 tensors; "
        "`local` = `clipheads score` end to end (read + decode pool + runtime + Parquet); Ray timed from dataset "
        "start (actor start-up included), `ray.init(num_cpus=2)`, 1 CPU (1 runtime thread) per actor; in parentheses: steady state after the first batch is back. raw and local are "
        f"medians of {res['rounds']} interleaved rounds on one warm runtime.", "",
        "| model | raw img/s | local img/s | local / raw (of medians) | local / raw per round, % | "
        "runtime idle, waiting for decode | ray 1 worker | ray 2 workers | ray 2/1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["models"].items():
        r1, r2 = r.get("ray_1"), r.get("ray_2")
        per_round = ", ".join(f"{100 * x:.0f}" for x in r["local_vs_raw_per_round"])
        loc = r["local"]
        busy = loc.get("runtime_s", 0) + loc.get("write_s", 0) + loc.get("wait_for_decode_s", 0)
        idle = f"{100 * loc.get('wait_for_decode_s', 0) / busy:.1f} %" if busy else "n/a"
        ray_cells = (f"{r1['images_per_s']:.1f} ({r1.get('steady_images_per_s', 0):.1f}) | "
                     f"{r2['images_per_s']:.1f} ({r2.get('steady_images_per_s', 0):.1f}) | "
                     f"{r['ray_scaling_2_over_1']:.2f}x ({r.get('ray_steady_scaling_2_over_1', 0):.2f}x) |"
                     if isinstance(r1, dict) else "n/a | n/a | n/a |")
        lines.append(
            f"| {name} ({r['arch']}) | {r['raw']['images_per_s']:.1f} | {r['local']['images_per_s']:.1f} | "
            f"{100 * r['local_vs_raw']:.0f} % | {per_round} (median {100 * float(np.median(r['local_vs_raw_per_round'])):.0f} %) "
            f"| {idle} | {ray_cells}"
        )
    lines += ["", "`runtime idle` is the share of the last local round the runtime spent waiting for decoded batches: "
              "near 0 means decoding kept up and the gap to raw is the runtime itself running slower next to the "
              "decode threads (and other jobs) on the same cores. The Ray steady-state figure starts when the first "
              "batch is back; with few batches per actor it is indicative only."]
    lines += ["", "Decode alone (one thread, serving.images): "
              + ", ".join(f"{n}: {r['raw']['decode_only_images_per_s_1_thread']:.0f} img/s" for n, r in res["models"].items())
              + ".", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
