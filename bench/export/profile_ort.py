"""Where the time goes inside each ONNX Runtime CPU variant: ORT's own profiler, time per op type.

    .venv/bin/python bench/export/profile_ort.py [--arch ViT-B-32] [--batch 16] [--out bench/export/profile.md]

Same graphs as bench_cpu.py (random-init zero-shot head, uint8 input): the plain export, attention
as com.microsoft.MultiHeadAttention (what fp32 bundles ship), that plus the offline transformer
fusions (the fp16/GPU recipe), and dynamic int8 of the attention-op graph (what int8 bundles ship). For each: best wall time of 5 runs, then 4 profiled
runs, summed kernel time per op type. For the int8 graph it also derives the throughput of its
int8 GEMMs (DynamicQuantizeMatMul) in GOP/s, to compare with the fp32 GEMM peak measured here.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
from bench_cpu import gemm_peak, linear_gflop, vit_gflop  # noqa: E402


def build(arch: str, work: Path) -> tuple[dict[str, Path], float, float, int]:
    import open_clip
    import torch

    from clipheads.export.attention import fused_attention
    from clipheads.export.fold import fold_heads
    from clipheads.export.onnx_export import export_image_graph
    from clipheads.export.optimize import fuse_transformer, tower_geometry
    from clipheads.export.quantize import quantize_dynamic_int8
    from clipheads.training.backbone import Backbone
    from clipheads.training.data.synth import CLASSES
    from clipheads.training.methods import TaskSpec, build_method

    torch.manual_seed(0)
    bb = Backbone(open_clip.create_model(arch, pretrained=None), open_clip.get_tokenizer(arch), arch=arch,
                  pretrained="none")
    enc = fold_heads([build_method("zeroshot", bb, (TaskSpec("world", tuple(CLASSES[:10])),))]).graphs[0].encoder
    g = {"plain (--no-fused-attention)": export_image_graph(enc, work / "plain.onnx")}
    with fused_attention(bb):
        mha = g["mha (fp32 bundles)"] = export_image_graph(enc, work / "mha.onnx")
    heads, width = tower_geometry(bb, "vision")
    g["gpu recipe (mha + offline fusions)"] = work / "gpu_recipe.onnx"
    fuse_transformer(mha, g["gpu recipe (mha + offline fusions)"], heads, width)
    g["int8 dynamic of mha (int8 bundles)"] = quantize_dynamic_int8(mha, work / "int8.onnx")
    return g, vit_gflop(bb), linear_gflop(bb), int(bb.preprocess.image_size)


def profile(path: Path, feed: dict, threads: int, work: Path) -> tuple[float, dict[str, float]]:
    import onnxruntime as ort

    def session(prof: bool):
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.log_severity_level = 3
        if prof:
            o.enable_profiling = True
            o.profile_file_prefix = str(work / path.stem)
        return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

    s = session(False)
    s.run(None, feed)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        s.run(None, feed)
        best = min(best, time.perf_counter() - t)
    sp = session(True)
    runs = 4
    for _ in range(runs):
        sp.run(None, feed)
    by: collections.Counter = collections.Counter()
    for e in json.load(open(sp.end_profiling())):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"] / 1000 / runs  # ms per run
    return best, dict(by)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(HERE / "profile.md"))
    args = ap.parse_args(argv)
    from clipheads.export.parity import probe_images

    peak = gemm_peak(args.threads)["gflops"]  # measured again at the end; the higher one counts
    lines, int8_rate = [], 0.0
    with tempfile.TemporaryDirectory(prefix="clipheads-prof-") as tmp:
        work = Path(tmp)
        graphs, gflop, lin_gflop, size = build(args.arch, work)
        probes, _ = probe_images(size, 16, seed=0)
        px = np.ascontiguousarray(np.resize(probes, (args.batch,) + probes.shape[1:]))
        feed = {"pixels": px, "task_index": np.zeros(args.batch, np.int64)}
        for name, path in graphs.items():
            best, ops = profile(path, feed, args.threads, work)
            total = sum(ops.values())
            lines += [f"### {name}: {args.batch / best:.1f} images/s (best of 5: {1000 * best:.0f} ms per batch); "
                      f"kernel time {total:.0f} ms per batch", "", "| op type | ms per batch | share |", "|---|---:|---:|"]
            lines += [f"| {op} | {ms:.1f} | {100 * ms / total:.1f}% |"
                      for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:10]]
            if "DynamicQuantizeMatMul" in ops:
                gemm_gop = args.batch * lin_gflop
                int8_rate = gemm_gop / (ops["DynamicQuantizeMatMul"] / 1000)
                lines += ["", f"int8 GEMMs (DynamicQuantizeMatMul): ~{int8_rate:.0f} GOP/s = RATIO the fp32 GEMM "
                              "peak ({peak} GFLOP/s, same threads). If every other op were free: "
                              f"{args.batch / (ops['DynamicQuantizeMatMul'] / 1000):.0f} images/s."]
            lines.append("")
    peak = max(peak, gemm_peak(args.threads)["gflops"])  # shared machine: contention only lowers it
    lines = [ln.replace("{peak}", f"{peak:.0f}").replace("RATIO", f"{int8_rate / peak:.1f}x" if int8_rate else "?")
             for ln in lines]
    head = [f"# ONNX Runtime CPU profile: {args.arch}, batch {args.batch}, {args.threads} threads", "",
            f"fp32 GEMM peak (torch.mm 2048^3) {peak:.0f} GFLOP/s; {gflop:.2f} GFLOP per image. Kernel times "
            "come from ORT's profiler (4 runs, per batch); wall times are the best of 5 unprofiled runs.", ""]
    Path(args.out).write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
