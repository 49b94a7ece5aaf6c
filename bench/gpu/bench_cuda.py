"""CUDA throughput of the folded image encoder in PyTorch: fp32 eager vs fp16 (eager, SDPA, CUDA graphs,
torch.compile), with the GPU's own dense matmul ceilings measured in the same run.

    python bench/gpu/bench_cuda.py [--archs ViT-B-16 ViT-B-32] [--batches 1 64 256] [--heads zeroshot maple]
        [--budget-s 480] [--out bench/gpu]

The module under test is what a bundle's image graph is (export.fold.FoldedImageEncoder: uint8 pixels
normalised on the device, 10-class zero-shot head, or an MmAP prompt bank (2 tasks) gathered by task index) on a
random-init open_clip architecture. Variants:

  fp32-eager            float32, TF32 off (the baseline the targets are stated against)
  fp32-tf32-eager       float32 weights, TF32 matmuls/convs
  fp16-eager            .half(); attention through nn.MultiheadAttention's inference fast path
  fp16-sdpa             .half(); attention swapped for export.attention's SDPA module (flash kernels)
  fp16-cudagraph        fp16-sdpa captured once per batch size in a CUDA graph and replayed
  fp16-compile          torch.compile (inductor, default mode) of fp16-sdpa
  fp16-compile-cudagraph  torch.compile(mode="reduce-overhead"): inductor kernels + CUDA graphs

Times come from CUDA events (median of repeated calls after warm-up; inputs already on the device).
Parity is measured against fp32-eager on 64 probe images (synthetic world + structured + noise):
min feature cosine and top-1 agreement of the logits, the export gate's fp16 criteria.
Results are written after every measurement, so a run cut short still leaves numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "export"))

from bench_cpu import vit_gflop  # noqa: E402  (analytic FLOPs per image, shared with the CPU bench)
from clipheads.serving.runtimes.torch_folded import CudaGraphed  # noqa: E402  (the serving runtime's graph replay)

VARIANTS = ("fp32-eager", "fp32-tf32-eager", "fp16-eager", "fp16-sdpa", "fp16-cudagraph", "fp16-compile",
            "fp16-compile-cudagraph")


def matmul_peak(dtype, n: int = 8192, reps: int = 20) -> dict:
    """Dense matmul rate through cuBLAS on random data (median of timed products after warm-up)."""
    import torch

    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_cuda(lambda: torch.mm(a, b), reps=reps, warmup=3)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}


def time_cuda(fn, reps: int = 30, warmup: int = 5, min_ms: float = 300.0) -> float:
    """Median milliseconds per call, by CUDA events around each call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(times) < reps or sum(times) < min_ms:
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) > 2000:
            break
    return float(np.median(times))


def parity(ref: tuple, got: tuple) -> dict:
    (rl, rf), (gl, gf) = ref, got
    rf_n = rf / np.linalg.norm(rf, axis=1, keepdims=True)
    gf_n = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    return {"min_feature_cosine": float((rf_n * gf_n).sum(1).min()),
            "top1_agreement": float((rl.argmax(1) == gl.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(rl - gl).max())}


def build_encoder(arch: str, head_kind: str):
    import open_clip
    import torch

    from clipheads.export.fold import fold_heads
    from clipheads.training.backbone import Backbone
    from clipheads.training.data.synth import CLASSES
    from clipheads.training.methods import TaskSpec, build_method

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    bb = Backbone(model, open_clip.get_tokenizer(arch), arch=arch, pretrained="none")
    tasks = (TaskSpec("a", tuple(CLASSES[:10])), TaskSpec("b", tuple(CLASSES[10:20])))
    head = build_method(head_kind, bb, tasks[:1] if head_kind == "zeroshot" else tasks)
    if head_kind != "zeroshot":  # random prompts (init is deterministic; make the tasks differ)
        with torch.no_grad():
            for p in head.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
    plan = fold_heads([head])
    return bb, plan.graphs[0].encoder


def bench(arch: str, head_kind: str, batches: list[int], deadline: float, log, record) -> None:
    import copy

    import torch

    from clipheads.export.attention import fused_attention
    from clipheads.export.parity import probe_images

    bb, enc32 = build_encoder(arch, head_kind)
    gflop = vit_gflop(bb)
    size = int(bb.preprocess.image_size)
    enc32 = enc32.cuda().eval()
    bank = getattr(enc32, "bank_size", 1)
    probes = torch.from_numpy(probe_images(size, 64, seed=0)[0]).cuda()
    probe_task = torch.arange(len(probes), device="cuda") % bank

    enc16 = copy.deepcopy(enc32).half()
    # SDPA attention for the fp16 graph the fast variants share (same swap the ONNX export uses)
    ctx = fused_attention(enc16.backbone)
    ctx.__enter__()

    def fp32(tf32: bool):
        def run(px, ti):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            return enc32(px, ti)
        return run

    enc16_mha = copy.deepcopy(enc32).half()  # plain nn.MultiheadAttention (fast path)
    runners = {"fp32-eager": fp32(False), "fp32-tf32-eager": fp32(True), "fp16-eager": enc16_mha,
               "fp16-sdpa": enc16, "fp16-cudagraph": CudaGraphed(enc16)}
    for name, mode in (("fp16-compile", "default"), ("fp16-compile-cudagraph", "reduce-overhead")):
        runners[name] = torch.compile(enc16, mode=mode, dynamic=False)

    with torch.inference_mode():
        ref = [t.float().cpu().numpy() for t in runners["fp32-eager"](probes, probe_task)]
        for name, run in runners.items():
            if time.time() > deadline:
                log(f"budget exhausted before {arch}/{head_kind}/{name}")
                break
            t0 = time.perf_counter()
            try:
                got = [t.float().cpu().numpy() for t in run(probes, probe_task)]
            except Exception as err:  # noqa: BLE001  (a variant that fails is reported, the rest go on)
                record(arch, head_kind, name, None, {"error": f"{type(err).__name__}: {str(err)[:300]}"})
                continue
            first_s = time.perf_counter() - t0
            par = parity(ref, got)
            for b in batches:
                if time.time() > deadline:
                    log(f"budget exhausted at {arch}/{head_kind}/{name} b{b}")
                    break
                px = probes.repeat((b + len(probes) - 1) // len(probes), 1, 1, 1)[:b].contiguous()
                ti = torch.arange(b, device="cuda") % bank
                t0 = time.perf_counter()
                run(px, ti)  # warm-up / compile / capture at this shape
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t0
                ms = time_cuda(lambda: run(px, ti))
                r = {"batch": b, "median_ms": ms, "images_per_s": b / ms * 1e3, "tflops": b * gflop / ms,
                     "first_call_s": round(max(first_s, warm_s), 2), "parity_vs_fp32": par,
                     "gflop_per_image": gflop}
                record(arch, head_kind, name, b, r)
                log(f"{arch} {head_kind:8s} {name:24s} b{b:<4d} {r['images_per_s']:9.1f} img/s "
                    f"{r['tflops']:7.1f} TFLOP/s  cos {par['min_feature_cosine']:.5f} top1 {par['top1_agreement']:.3f}")
    ctx.__exit__(None, None, None)
    del runners
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def machine() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2 ** 30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        import open_clip
        import triton

        info["open_clip"], info["triton"] = open_clip.__version__, triton.__version__
    except ImportError:
        pass
    return info


def write_md(res: dict, path: Path) -> None:
    m, peaks = res["machine"], res["peaks"]
    p16 = peaks["float16"]["tflops"]
    lines = [
        "# PyTorch CUDA runtime benchmark (folded image encoder)", "",
        f"Device: {m['gpu']} (cc {m['compute_capability']}, {m['sm_count']} SMs, {m['memory_gib']} GiB); "
        f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, open_clip {m.get('open_clip', '?')}, "
        f"triton {m.get('triton', '?')}.", "",
        "Dense matmul ceilings measured in this run (cuBLAS, 8192^3, random data): "
        + ", ".join(f"{k} {v['tflops']:.0f} TFLOP/s" for k, v in peaks.items()) + ".", "",
        "Median of CUDA-event-timed calls, inputs (uint8 pixels) already on the GPU. % peak = achieved / fp16 "
        "matmul ceiling. Parity vs fp32-eager on 64 probes.", "",
        "| arch | head | variant | batch | images/s | ms/call | TFLOP/s | % fp16 peak | min cos | top-1 agree | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['head']} | {r['variant']} | - | error: {r['error'][:80]} |||||||")
            continue
        p = r["parity_vs_fp32"]
        lines.append(f"| {r['arch']} | {r['head']} | {r['variant']} | {r['batch']} | {r['images_per_s']:.0f} | "
                     f"{r['median_ms']:.3f} | {r['tflops']:.1f} | {100 * r['tflops'] / p16:.1f}% | "
                     f"{p['min_feature_cosine']:.5f} | {p['top1_agreement']:.3f} | {r['first_call_s']} |")
    lines += ["", "## Targets (issue 6)", ""]
    lines += [f"- {t}" for t in targets(res)]
    path.write_text("\n".join(lines) + "\n")


def targets(res: dict) -> list[str]:
    rows = [r for r in res["rows"] if "error" not in r and r["head"] == "zeroshot"]
    p16 = res["peaks"]["float16"]["tflops"]
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        def pick(variant_prefix, batch_ok):
            c = [r for r in rows if r["arch"] == arch and r["variant"].startswith(variant_prefix) and batch_ok(r["batch"])]
            return max(c, key=lambda r: r["images_per_s"]) if c else None

        base1 = pick("fp32-eager", lambda b: b == 1)
        fast1 = pick("fp16", lambda b: b == 1)
        if base1 and fast1:
            ratio = fast1["images_per_s"] / base1["images_per_s"]
            out.append(f"{arch} batch 1: best fp16 ({fast1['variant']}) {fast1['images_per_s']:.0f} img/s = {ratio:.1f}x "
                       f"fp32 eager {base1['images_per_s']:.0f} img/s (target >= 3x): {'met' if ratio >= 3 else 'NOT met'}")
        big = pick("fp16", lambda b: b >= 64)
        if big:
            frac = big["tflops"] / p16
            out.append(f"{arch} batch >= 64: best fp16 ({big['variant']}, b{big['batch']}) {big['tflops']:.0f} TFLOP/s = "
                       f"{frac:.0%} of the fp16 matmul ceiling {p16:.0f} (target >= 30% for ViT-B-16): "
                       f"{'met' if frac >= 0.3 else 'NOT met'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-16", "ViT-B-32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    ap.add_argument("--heads", nargs="+", default=["zeroshot", "mmap"])
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting new measurements after this")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.mha.set_fastpath_enabled(True)
    deadline = time.time() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[bench] {msg}", flush=True)

    res = {"started_unix": int(time.time()), "machine": machine(), "rows": [],
           "peaks": {k: matmul_peak(getattr(torch, k)) for k in ("float16", "bfloat16")}}
    torch.backends.cuda.matmul.allow_tf32 = False
    res["peaks"]["float32"] = matmul_peak(torch.float32, n=4096)
    log(f"{res['machine']['gpu']}: " + ", ".join(f"{k} {v['tflops']:.0f} TFLOP/s" for k, v in res["peaks"].items()))

    def record(arch, head, variant, batch, r):
        res["rows"].append({"arch": arch, "head": head, "variant": variant, **({"batch": batch} if batch else {}), **r})
        (out / "results.json").write_text(json.dumps(res, indent=1))
        write_md(res, out / "results.md")

    for head in args.heads:
        for arch in args.archs:
            if head != "zeroshot" and arch != args.archs[0]:
                continue  # prompt-bank graphs: the first arch only (what the bank costs, not another sweep)
            bench(arch, head, args.batches, deadline, log, record)
    print("\n".join(targets(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
