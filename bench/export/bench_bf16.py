"""CPU bf16 path, measured: the folded image encoder in PyTorch bf16 vs fp32 (eager) vs our fp32 ONNX graph.

    .venv/bin/python bench/export/bench_bf16.py [--archs ViT-B-32 ViT-B-16] [--batch 16] [--out bench/export]

Zen 4/5 and Sapphire Rapids have AVX512-BF16 (Sapphire Rapids also AMX), which oneDNN uses for
bf16 matmuls. Variants, interleaved rounds, best round reported (the machine may be shared):

  torch-fp32        the folded module, float32, inference_mode
  torch-bf16        the same module converted to bfloat16 (.to(torch.bfloat16); uint8 in, bf16 math)
  torch-bf16-amp    float32 module under torch.autocast("cpu", dtype=torch.bfloat16)
  ort-ours-fp32     what `clipheads export --target onnx --precision fp32` ships

Parity of each vs torch-fp32 on 16 probes: top-1 agreement and min feature cosine.
Writes OUT/bf16.json and OUT/bf16.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import gemm_peak, machine, parity, vit_gflop  # noqa: E402


def bench_arch(arch: str, batch: int, threads: int, rounds: int, work: Path, log) -> dict:
    import onnxruntime as ort
    import open_clip
    import torch

    from clipheads.export.attention import fused_attention
    from clipheads.export.fold import fold_heads
    from clipheads.export.onnx_export import export_image_graph
    from clipheads.export.optimize import fuse_transformer, tower_geometry
    from clipheads.export.parity import probe_images
    from clipheads.training.backbone import Backbone
    from clipheads.training.data.synth import CLASSES
    from clipheads.training.methods import TaskSpec, build_method

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    bb = Backbone(model, open_clip.get_tokenizer(arch), arch=arch, pretrained="none")
    enc = fold_heads([build_method("zeroshot", bb, (TaskSpec("world", tuple(CLASSES[:10])),))]).graphs[0].encoder.eval()
    with fused_attention(bb):
        mha = export_image_graph(enc, work / f"{arch}_mha.onnx")
    heads, width = tower_geometry(bb, "vision")
    fuse_transformer(mha, work / f"{arch}_ours.onnx", heads, width)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(work / f"{arch}_ours.onnx"), opts, providers=["CPUExecutionProvider"])
    enc_bf16 = copy.deepcopy(enc).to(torch.bfloat16)
    torch.set_num_threads(threads)

    def torch_run(mod, amp=False):
        def run(px):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                lo, f = mod(torch.from_numpy(px), torch.zeros(len(px), dtype=torch.long))
            return lo.float().numpy(), f.float().numpy()
        return run

    runners = {
        "torch-fp32": torch_run(enc),
        "torch-bf16": torch_run(enc_bf16),
        "torch-bf16-amp": torch_run(enc, amp=True),
        "ort-ours-fp32": lambda px: tuple(sess.run(["logits", "features"],
                                                   {"pixels": px, "task_index": np.zeros(len(px), np.int64)})),
    }
    probes, _ = probe_images(bb.preprocess.image_size, 16, seed=0)
    ref = runners["torch-fp32"](probes)
    gflop = vit_gflop(bb)
    res = {"arch": arch, "batch": batch, "gflop_per_image": gflop, "variants": {}}
    px = np.ascontiguousarray(np.resize(probes, (batch,) + probes.shape[1:]))
    times = {n: [] for n in runners}
    for run in runners.values():
        run(px)  # warm-up (oneDNN primitive creation)
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(px)
            times[name].append(time.perf_counter() - t0)
    for name, run in runners.items():
        best = min(times[name])
        res["variants"][name] = {"images_per_s": batch / best, "gflops": batch / best * gflop,
                                 "median_images_per_s": batch / float(np.median(times[name])),
                                 "parity_vs_fp32": parity(ref, run(probes))}
        log(f"{arch} {name}: {batch / best:.2f} img/s ({batch / best * gflop:.0f} GFLOP/s)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = lambda m: print(f"[bf16] {m}", file=sys.stderr, flush=True)  # noqa: E731
    res = {"machine": machine(), "threads": args.threads, "loadavg_start": list(os.getloadavg()),
           "gemm_fp32": gemm_peak(args.threads), "archs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            res["archs"].append(bench_arch(arch, args.batch, args.threads, args.rounds, Path(tmp), log))
    res["loadavg_end"] = list(os.getloadavg())
    out = Path(args.out)
    (out / "bf16.json").write_text(json.dumps(res, indent=1))
    peak = res["gemm_fp32"]["gflops"]
    lines = ["# CPU bf16 path (PyTorch) vs fp32", "",
             f"Machine: {res['machine'].get('Model name', '?')}, SIMD {', '.join(res['machine'].get('simd', []))}; "
             f"{args.threads} threads; fp32 GEMM peak {peak:.0f} GFLOP/s; load {res['loadavg_start'][0]:.1f} -> "
             f"{res['loadavg_end'][0]:.1f}. Batch {args.batch}, best of {args.rounds} interleaved rounds.", "",
             "| arch | variant | images/s | x torch-fp32 | GFLOP/s | % of fp32 GEMM peak | top-1 agree | min cos |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in res["archs"]:
        base = a["variants"]["torch-fp32"]["images_per_s"]
        for name, v in a["variants"].items():
            p = v["parity_vs_fp32"]
            lines.append(f"| {a['arch']} | {name} | {v['images_per_s']:.2f} | {v['images_per_s'] / base:.2f} | "
                         f"{v['gflops']:.0f} | {100 * v['gflops'] / peak:.0f}% | {p['top1_agreement']:.0%} | "
                         f"{p['min_feature_cosine']:.4f} |")
    (out / "bf16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
