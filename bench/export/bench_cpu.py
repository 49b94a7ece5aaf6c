"""CPU throughput of the exported image graph vs PyTorch, against the machine's measured GEMM roofs.

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
  ort-int8-dynamic-mha  ort-mha + dynamic per-channel int8 (`--int8-mode dynamic`, the recipe before 17.3)
  ort-int8-static-mha   ort-mha + the calibrated static recipe `--precision int8` ships (quantize.py:
                    QDQ, per-channel weights, 64 synthetic-world calibration images, sensitive
                    MatMuls kept fp32 by the random-init selection)

plus the roofs measured at the start and the end of the run with the same threads: fp32 = the
faster of torch.mm and an ORT MatMul of 2048^3, int8 = ORT MatMulInteger u8 x s8 2048^3 (VNNI);
every % of roof is against them. Parity of every variant against torch-eager on 64 synthetic-world
images (max |delta logit|, top-1 agreement raw and on the decided half, min feature cosine).
Writes OUT/results.json and OUT/results.md.
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


def machine_line(m: dict) -> str:
    """The "Machine: ..." opening of every CPU bench report, from `machine()`."""
    return (f"Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('cpu_count'))} CPU(s), "
            f"SIMD {', '.join(m.get('simd', []))}")


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


SETTLE_S = 0.2  # pause before each timed call of an interleaved round


def timed_alone(run, *args) -> float:
    """Seconds for one call, after a pause: an ORT session's intra-op pool (and torch's OpenMP
    threads) keep spinning for a while after their call, so the variant timed right after another
    one shared the 2 cores with it (measured: static int8 ViT-B/32 55 vs 63 img/s without / with
    the pause, 2026-12-07). Each variant is then timed as it runs when deployed alone."""
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    run(*args)
    return time.perf_counter() - t0


def best_time(call, seconds: float, min_reps: int = 3) -> tuple[float, int]:
    """Fastest of repeated `call()`s over `seconds` (at least `min_reps`): contention only adds time."""
    best, t_end, reps = float("inf"), time.perf_counter() + seconds, 0
    while time.perf_counter() < t_end or reps < min_reps:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best, reps


def gemm_peak(threads: int, n: int = 2048, seconds: float = 3.0) -> dict:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, reps = best_time(lambda: torch.mm(a, b), seconds)
    return {"n": n, "threads": threads, "best_s": best, "gflops": 2 * n ** 3 / best / 1e9, "reps": reps}


def ort_matmul_roof(threads: int, n: int = 2048, seconds: float = 3.0, int8: bool = False) -> dict:
    """The same n^3 product in ONNX Runtime: fp32 MatMul (MLAS SGEMM) or, with `int8`, MatMulInteger
    uint8 x int8 (MLAS's VNNI kernel on this CPU) -- what our graphs' GEMMs actually run on."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a_t, b_t = (TensorProto.UINT8, TensorProto.INT8) if int8 else (TensorProto.FLOAT, TensorProto.FLOAT)
    op = "MatMulInteger" if int8 else "MatMul"
    out_t = TensorProto.INT32 if int8 else TensorProto.FLOAT
    g = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "roof",
                          [helper.make_tensor_value_info("a", a_t, [n, n]), helper.make_tensor_value_info("b", b_t, [n, n])],
                          [helper.make_tensor_value_info("y", out_t, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if int8:
        feed = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8), "b": rng.integers(-128, 128, (n, n), dtype=np.int8)}
    else:
        feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feed)
    best, reps = best_time(lambda: sess.run(None, feed), seconds)
    return {"n": n, "threads": threads, "op": op, "best_s": best, "gflops": 2 * n ** 3 / best / 1e9, "reps": reps}


def roofs(threads: int) -> dict:
    """fp32 roof = the faster of torch.mm and ORT MatMul of the same size; int8 roof = ORT MatMulInteger."""
    r = {"torch_mm": gemm_peak(threads), "ort_matmul": ort_matmul_roof(threads),
         "ort_matmul_integer": ort_matmul_roof(threads, int8=True)}
    r["fp32_gflops"] = max(r["torch_mm"]["gflops"], r["ort_matmul"]["gflops"])
    r["int8_gops"] = r["ort_matmul_integer"]["gflops"]
    return r


def parity(ref: tuple, got: tuple) -> dict:
    (rl, rf), (gl, gf) = ref, got
    cos = (rf * gf).sum(1) / (np.linalg.norm(rf, axis=1) * np.linalg.norm(gf, axis=1))
    return {"max_abs_logit_diff": float(np.abs(rl - gl).max()),
            "top1_agreement": float((rl.argmax(1) == gl.argmax(1)).mean()), "min_feature_cosine": float(cos.min())}


def bench_arch(arch: str, batches: list[int], threads: int, min_seconds: float, compile_: bool, work: Path,
               log, rounds: int = 3, skip: tuple[str, ...] = ()) -> dict:
    import onnxruntime as ort
    import open_clip
    import torch

    from clipheads.export.attention import fused_attention
    from clipheads.export.fold import fold_heads
    from clipheads.export.onnx_export import export_image_graph
    from clipheads.export.optimize import fuse_transformer, op_counts, tower_geometry
    from clipheads.export.gate_images import world_images
    from clipheads.export.parity import agreement, probe_images
    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated, quantize_dynamic_int8
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
    int8_dyn_mha = quantize_dynamic_int8(mha, work / f"{arch}_int8_dyn_mha.onnx")
    res["quantize_dynamic_s"] = time.perf_counter() - t0
    int8_static = None
    try:  # what `--precision int8` ships: calibrated static QDQ, sensitive MatMuls fp32 (random-init: decided half)
        t0 = time.perf_counter()
        calib = world_images(bb.preprocess, 64, seed=1).pixels

        from clipheads.export.pipeline import _selection_score

        int8_static = work / f"{arch}_int8_static_mha.onnx"
        res["int8_static_report"] = quantize_calibrated(mha, int8_static, image_feeds(calib, [0]), Int8Recipe(),
                                                        _selection_score("random-init", Int8Recipe().target_agreement),
                                                        log)
        res["quantize_static_s"] = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001
        int8_static = None
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
    runners["ort-int8-dynamic-mha"] = ort_runner(int8_dyn_mha)
    if int8_static is not None:
        runners["ort-int8-static-mha"] = ort_runner(int8_static)
    for name in skip:
        runners.pop(name, None)

    probes = world_images(bb.preprocess, 64, seed=0).pixels  # the gate's kind of image (not noise)
    ref = runners["torch-eager"](probes)
    for name, run in runners.items():
        got = run(probes)
        res["variants"][name] = {"parity_vs_eager": {**parity(ref, got), "top1_agreement_decided_half":
                                                     agreement(ref[0], got[0])["top1_agreement_decided_half"]},
                                 "batches": {}}
    probes = probes[:16]
    # Interleaved rounds: every round runs each variant once, so background load hits all variants
    # alike; contention only ever adds time, so the best round is the least disturbed estimate.
    for b in batches:
        px = np.ascontiguousarray(np.resize(probes, (b,) + probes.shape[1:]))
        times: dict[str, list[float]] = {n: [] for n in runners}
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(px)  # warm-up (and torch.compile's recompile for this batch size)
            res.setdefault("first_call_seconds", {}).setdefault(name, {})[str(b)] = time.perf_counter() - t0
        t_end = time.perf_counter() + min_seconds
        while min(len(v) for v in times.values()) < rounds or time.perf_counter() < t_end:
            for name, run in runners.items():
                times[name].append(timed_alone(run, px))
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
    r0, r1 = results["roofs_start"], results["roofs_end"]
    fp32_roof = max(r0["fp32_gflops"], r1["fp32_gflops"])
    int8_roof = max(r0["int8_gops"], r1["int8_gops"])
    lines = [
        "# export/ CPU benchmark", "",
        machine_line(m) + f"; threads used: {results['threads']}; versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        "**Roofs** (2048^3, same threads, start / end of the run): "
        f"torch.mm {r0['torch_mm']['gflops']:.0f} / {r1['torch_mm']['gflops']:.0f} GFLOP/s, "
        f"ORT MatMul {r0['ort_matmul']['gflops']:.0f} / {r1['ort_matmul']['gflops']:.0f} GFLOP/s, "
        f"ORT MatMulInteger (u8 x s8, VNNI) {r0['int8_gops']:.0f} / {r1['int8_gops']:.0f} GOP/s. "
        f"The fp32 roof is the faster fp32 one (**{fp32_roof:.0f} GFLOP/s**), the int8 roof ORT's MatMulInteger "
        f"(**{int8_roof:.0f} GOP/s**); every % below is against them (int8 variants: their model GOP/s against "
        "the int8 roof).",
        f"Load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}: "
        + results["contention_note"], "",
        "images/s from the best of the interleaved rounds (contention only adds time); the median column shows how "
        "much the shared machine disturbed the runs. Parity vs torch-eager on 64 synthetic-world images "
        "(random-init weights: raw top-1 flips on near-ties; `decided` = agreement on the half with the larger "
        "reference margin, the random-init gate).", "",
        "| arch | variant | batch | images/s (best) | images/s (median) | x eager | G(FL)OP/s | % of roof | "
        "max abs dlogit | top-1 agree | decided | min cos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in results["archs"]:
        eager = a["variants"]["torch-eager"]["batches"]
        for name, v in a["variants"].items():
            p = v["parity_vs_eager"]
            roof = int8_roof if "int8" in name else fp32_roof
            for b, r in v["batches"].items():
                lines.append(f"| {a['arch']} ({a['gflop_per_image']:.2f} GFLOP/img) | {name} | {b} | {r['images_per_s']:.2f} | "
                             f"{r['images_per_s_median']:.2f} | {r['images_per_s'] / eager[b]['images_per_s']:.2f}x | "
                             f"{r['gflops']:.0f} | {100 * r['gflops'] / roof:.0f}% | {p['max_abs_logit_diff']:.2e} | "
                             f"{p['top1_agreement']:.0%} | {p.get('top1_agreement_decided_half', float('nan')):.0%} | "
                             f"{p['min_feature_cosine']:.5f} |")
    lines += ["", "Notes:"]
    for a in results["archs"]:
        extra = {k: round(v, 1) if isinstance(v, float) else v for k, v in a.items()
                 if k.endswith("_s") or k.endswith("_error")}
        first = {k: {b: round(t, 2) for b, t in v.items()} for k, v in a.get("first_call_seconds", {}).items()
                 if k.startswith("torch-compile")}
        rep = a.get("int8_static_report") or {}
        lines.append(f"- {a['arch']}: ort-gpu-recipe offline fusions {a['fusion']['fused']}; {extra}; torch.compile "
                     f"first call per batch size (s, recompiles included) {first}; int8-static kept fp32: "
                     f"{[k['node'] + ' (' + k['reason'] + ')' for k in rep.get('kept_fp32', [])]} "
                     f"({rep.get('kept_flops_share', 0):.2%} of the quantizable FLOPs), "
                     f"{rep.get('quantized_nodes')} of {rep.get('candidate_nodes')} MatMuls int8")
    path.write_text("\n".join(lines) + "\n")



def run_header(threads: int, **extra) -> dict:
    """The start of every CPU bench result: time, machine, load and roofs before the first round."""
    return {"started_unix": int(time.time()), "threads": threads, **extra, "machine": machine(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "roofs_start": roofs(threads), "archs": []}


def close_run(results: dict, threads: int) -> None:
    """Roofs and load after the last round (a loaded run shows as roofs that moved)."""
    results["roofs_end"] = roofs(threads)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


def save_run(results: dict, out: str | Path, stem: str, write_md, log) -> None:
    """OUT/STEM.json (every round) and OUT/STEM.md (the tables `write_md` makes of it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    write_md(results, out / f"{stem}.md")
    log(f"wrote {out / stem}.json and .md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per batch size, all variants together")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every variant once)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], help="variants not to time (e.g. ort-gpu-recipe)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--model-configs", default=None, help="extra open_clip config dir (e.g. tests/model_configs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model_configs:
        import open_clip

        open_clip.add_model_config(args.model_configs)

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    results = run_header(args.threads)
    log(f"roofs {dict((k, round(v['gflops'])) for k, v in results['roofs_start'].items() if isinstance(v, dict))}; "
        f"load {results['loadavg_start']}")
    with tempfile.TemporaryDirectory(prefix="clipheads-bench-") as tmp:
        for arch in args.archs:
            results["archs"].append(bench_arch(arch, args.batches, args.threads, args.min_seconds, not args.no_compile,
                                               Path(tmp), log, args.rounds, tuple(args.skip)))
    close_run(results, args.threads)
    busy = max(results["loadavg_start"][0], results["loadavg_end"][0]) > 0.5 * (os.cpu_count() or 1)
    results["contention_note"] = (
        "the machine was shared with other jobs (load above half the cores): absolute numbers are pessimistic "
        "and noisy; compare variants within this run only." if busy else "machine was mostly idle.")
    save_run(results, args.out, "results", write_md, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
