"""CPU throughput of the exported image graph vs PyTorch, with the machine's GEMM peak as yardstick.

    .venv/bin/python bench/export/bench_cpu.py [--archs ViT-B-32 ViT-B-16] [--batches 1 16]
        [--threads N] [--min-seconds 2] [--no-compile] [--out bench/export]

For each random-init architecture (zero-shot head, 10 classes, uint8 input normalised in the
graph, i.e. the default bundle graph) and batch size, measures images/s and achieved GFLOP/s of:

  torch-eager       the folded module (FoldedImageEncoder) in PyTorch, inference_mode
  torch-compile     torch.compile of the same module (compile time reported separately)
  ort-plain         the plain TorchScript-exported opset-17 graph, ORT defaults (ORT_ENABLE_ALL):
                    what `clipheads export --no-fused-attention` ships
  ort-mha           attention exported as one com.microsoft.MultiHeadAttention node per block: what
                    `clipheads export --target onnx --precision fp32` ships (ORT fuses the rest at load)
  ort-gpu-recipe    ort-mha + onnxruntime.transformers' offline fusions (SkipLayerNorm, BiasGelu):
                    what fp16 bundles get, measured here in fp32 to show why CPU precisions skip it
  ort-int8-dynamic  ort-plain + dynamic per-channel int8 (MatMul/Gemm)
  ort-int8-dynamic-mha  the same on ort-mha: what --precision int8 ships
  ort-int8-qdq      plain graph + static QDQ int8 (MinMax calibration on 16 seeded probes)

plus the fp32 GEMM peak of this machine measured in the same run (torch.mm 2048^3, same threads),
and the parity of every variant against torch-eager on 16 seeded probe images (max |delta logit|,
top-1 agreement, min feature cosine). Writes OUT/results.json and OUT/results.md.
FLOPs per image are counted analytically (2 x MACs of patch embedding, attention, MLP, projection).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _vit_dims(backbone) -> tuple[int, int, int, int, int]:
    """(patch grid cells, patch size, width, MLP width, layers) of a ViT image tower."""
    v = backbone.model.visual
    p = int(v.conv1.kernel_size[0])
    return ((int(backbone.preprocess.image_size) // p) ** 2, p, int(v.class_embedding.shape[-1]),
            int(v.transformer.resblocks[0].mlp.c_fc.out_features), len(v.transformer.resblocks))


def linear_gflop(backbone) -> float:
    """GFLOP per image of the transformer's Linear layers (qkv, out, MLP): what int8 quantizes."""
    g, _, d, mlp, layers = _vit_dims(backbone)
    return 2 * layers * (g + 1) * (4 * d * d + 2 * d * mlp) / 1e9


def vit_gflop(backbone) -> float:
    g, p, d, mlp, layers = _vit_dims(backbone)
    t = g + 1
    macs = g * 3 * p * p * d  # patch embedding
    macs += layers * 2 * t * t * d  # QK^T and AV
    macs += d * int(backbone.model.visual.output_dim)  # projection of the pooled token
    return linear_gflop(backbone) + 2 * macs / 1e9


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                             "L2 cache", "L3 cache", "CPU max MHz"):
                info[k.strip()] = v.strip()
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")
                        if f" {f}" in flags]
    except Exception as err:  # noqa: BLE001
        info["lscpu_error"] = str(err)
    import onnx
    import onnxruntime
    import open_clip
    import torch

    info["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                        "open_clip": open_clip.__version__, "numpy": np.__version__}
    return info


def gemm_peak(threads: int, n: int = 2048, seconds: float = 3.0) -> dict:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, t_end, reps = float("inf"), time.perf_counter() + seconds, 0
    while time.perf_counter() < t_end or reps < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return {"n": n, "threads": threads, "best_s": best, "gflops": 2 * n ** 3 / best / 1e9, "reps": reps}


def parity(ref: tuple, got: tuple) -> dict:
    (rl, rf), (gl, gf) = ref, got
    cos = (rf * gf).sum(1) / (np.linalg.norm(rf, axis=1) * np.linalg.norm(gf, axis=1))
    return {"max_abs_logit_diff": float(np.abs(rl - gl).max()),
            "top1_agreement": float((rl.argmax(1) == gl.argmax(1)).mean()), "min_feature_cosine": float(cos.min())}


def bench_arch(arch: str, batches: list[int], threads: int, min_seconds: float, compile_: bool, work: Path,
               log, rounds: int = 3) -> dict:
    import onnxruntime as ort
    import open_clip
    import torch

    from clipheads.export.attention import fused_attention
    from clipheads.export.fold import fold_heads
    from clipheads.export.onnx_export import export_image_graph
    from clipheads.export.optimize import fuse_transformer, op_counts, tower_geometry
    from clipheads.export.parity import probe_images
    from clipheads.export.quantize import quantize_dynamic_int8, quantize_static_qdq
    from clipheads.training.backbone import Backbone
    from clipheads.training.data.synth import CLASSES
    from clipheads.training.methods import TaskSpec, build_method

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    bb = Backbone(model, open_clip.get_tokenizer(arch), arch=arch, pretrained="none")
    head = build_method("zeroshot", bb, (TaskSpec("world", tuple(CLASSES[:10])),))
    plan = fold_heads([head])
    enc = plan.graphs[0].encoder
    gflop = vit_gflop(bb)
    res: dict = {"arch": arch, "gflop_per_image": gflop, "image_size": bb.preprocess.image_size, "variants": {}}

    t0 = time.perf_counter()
    plain = export_image_graph(enc, work / f"{arch}_plain.onnx")
    with fused_attention(bb):
        mha = export_image_graph(enc, work / f"{arch}_mha.onnx")
    heads_, width = tower_geometry(bb, "vision")
    gpu_recipe = work / f"{arch}_gpu_recipe.onnx"
    fusion = fuse_transformer(mha, gpu_recipe, heads_, width)
    res["export_s"] = time.perf_counter() - t0
    res["fusion"] = fusion
    res["gpu_recipe_ops"] = {k: v for k, v in op_counts(gpu_recipe).items()
                             if "." in k or k in ("MatMul", "LayerNormalization")}
    log(f"{arch}: exported ({res['export_s']:.0f} s), offline fusions {fusion['fused']}")
    t0 = time.perf_counter()
    int8_dyn = quantize_dynamic_int8(plain, work / f"{arch}_int8_dyn.onnx")
    int8_dyn_mha = quantize_dynamic_int8(mha, work / f"{arch}_int8_dyn_mha.onnx")
    res["quantize_dynamic_s"] = time.perf_counter() - t0
    int8_qdq = None
    try:
        t0 = time.perf_counter()
        calib, _ = probe_images(bb.preprocess.image_size, 16, seed=1)
        int8_qdq = quantize_static_qdq(plain, work / f"{arch}_int8_qdq.onnx", calib, [0])
        res["quantize_static_s"] = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        res["quantize_static_error"] = f"{type(err).__name__}: {err}"
    log(f"{arch}: quantized")

    def session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.log_severity_level = 3
        return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    torch.set_num_threads(threads)
    runners = {}

    def torch_runner(mod):
        def run(px):
            with torch.inference_mode():
                lo, f = mod(torch.from_numpy(px), torch.zeros(len(px), dtype=torch.long))
            return lo.numpy(), f.numpy()
        return run

    def ort_runner(path):
        s = session(path)
        return lambda px: tuple(s.run(["logits", "features"], {"pixels": px, "task_index": np.zeros(len(px), np.int64)}))

    runners["torch-eager"] = torch_runner(enc)
    if compile_:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(enc)
            warm = probe_images(bb.preprocess.image_size, 2)[0]
            torch_runner(compiled)(warm)
            res["torch_compile_first_call_s"] = time.perf_counter() - t0
            runners["torch-compile"] = torch_runner(compiled)
        except Exception as err:  # noqa: BLE001
            res["torch_compile_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    runners["ort-plain"] = ort_runner(plain)
    runners["ort-mha"] = ort_runner(mha)
    runners["ort-gpu-recipe"] = ort_runner(gpu_recipe)
    runners["ort-int8-dynamic"] = ort_runner(int8_dyn)
    runners["ort-int8-dynamic-mha"] = ort_runner(int8_dyn_mha)
    if int8_qdq is not None:
        runners["ort-int8-qdq"] = ort_runner(int8_qdq)

    probes, _ = probe_images(bb.preprocess.image_size, 16, seed=0)
    ref = runners["torch-eager"](probes)
    for name, run in runners.items():
        res["variants"][name] = {"parity_vs_eager": parity(ref, run(probes)), "batches": {}}
    # Interleaved rounds: every round runs each variant once, so background load hits all variants
    # alike; contention only ever adds time, so the best round is the least disturbed estimate.
    for b in batches:
        px = np.ascontiguousarray(np.resize(probes, (b,) + probes.shape[1:]))
        times: dict[str, list[float]] = {n: [] for n in runners}
        for run in runners.values():
            run(px)  # warm-up (and torch.compile's recompile for this batch size)
        t_end = time.perf_counter() + min_seconds
        while min(len(v) for v in times.values()) < rounds or time.perf_counter() < t_end:
            for name, run in runners.items():
                t0 = time.perf_counter()
                run(px)
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            best, med = float(min(ts)), float(np.median(ts))
            res["variants"][name]["batches"][str(b)] = {
                "rounds": len(ts), "best_s": best, "median_s": med, "images_per_s": b / best,
                "images_per_s_median": b / med, "gflops": b / best * gflop}
            log(f"{arch} {name} b{b}: best {b / best:.1f} img/s ({b / best * gflop:.1f} GFLOP/s), "
                f"median {b / med:.1f} img/s over {len(ts)} rounds")
    return res


def write_md(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        "# export/ CPU benchmark", "",
        f"Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('cpu_count'))} CPU(s), SIMD {', '.join(m.get('simd', []))}; "
        f"threads used: {results['threads']}; versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        f"fp32 GEMM peak (torch.mm {results['gemm_start']['n']}^3, same threads): start {results['gemm_start']['gflops']:.1f} "
        f"GFLOP/s, end {results['gemm_end']['gflops']:.1f} GFLOP/s.",
        f"Load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}: "
        + results["contention_note"], "",
        "images/s and GFLOP/s from the best of the interleaved rounds (contention only adds time); the median "
        "column shows how much the shared machine disturbed the runs.", "",
        "| arch | variant | batch | images/s (best) | images/s (median) | GFLOP/s | % of GEMM peak | max abs dlogit | top-1 agree | min cos |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = max(results["gemm_start"]["gflops"], results["gemm_end"]["gflops"])
    for a in results["archs"]:
        for name, v in a["variants"].items():
            p = v["parity_vs_eager"]
            for b, r in v["batches"].items():
                lines.append(f"| {a['arch']} ({a['gflop_per_image']:.2f} GFLOP/img) | {name} | {b} | {r['images_per_s']:.2f} | "
                             f"{r['images_per_s_median']:.2f} | "
                             f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% | {p['max_abs_logit_diff']:.2e} | "
                             f"{p['top1_agreement']:.0%} | {p['min_feature_cosine']:.5f} |")
    lines += ["", "Notes:"]
    for a in results["archs"]:
        extra = {k: round(v, 1) if isinstance(v, float) else v for k, v in a.items()
                 if k.endswith("_s") or k.endswith("_error")}
        lines.append(f"- {a['arch']}: ort-gpu-recipe offline fusions {a['fusion']['fused']}, contrib/key ops "
                     f"{a['gpu_recipe_ops']}; {extra}")
    lines.append("- Parity is vs torch-eager on 16 seeded probes (random-init weights: near-tied logits make "
                 "int8 top-1 a harsh test).")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per batch size, all variants together")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every variant once)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--model-configs", default=None, help="extra open_clip config dir (e.g. tests/model_configs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model_configs:
        import open_clip

        open_clip.add_model_config(args.model_configs)

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    results = {"started_unix": int(time.time()), "threads": args.threads, "machine": machine(),
               "loadavg_start": [round(x, 2) for x in os.getloadavg()], "gemm_start": gemm_peak(args.threads),
               "archs": []}
    log(f"GEMM peak {results['gemm_start']['gflops']:.1f} GFLOP/s; load {results['loadavg_start']}")
    with tempfile.TemporaryDirectory(prefix="clipheads-bench-") as tmp:
        for arch in args.archs:
            results["archs"].append(bench_arch(arch, args.batches, args.threads, args.min_seconds, not args.no_compile,
                                               Path(tmp), log, args.rounds))
    results["gemm_end"] = gemm_peak(args.threads)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    busy = max(results["loadavg_start"][0], results["loadavg_end"][0]) > 0.5 * (os.cpu_count() or 1)
    results["contention_note"] = (
        "the machine was shared with other jobs (load above half the cores): absolute numbers are pessimistic "
        "and noisy; compare variants within this run only." if busy else "machine was mostly idle.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_md(results, out / "results.md")
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
