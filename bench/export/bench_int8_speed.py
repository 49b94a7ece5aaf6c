"""int8 speed on ViT-B (issue 17.3 speed half, 17.4): the shipped int8 graph vs eager fp32 PyTorch.

    flock /work/wt/bench.lock nice -n 0 .venv/bin/python bench/export/bench_int8_speed.py \
        [--archs ViT-B-32 ViT-B-16] [--rounds 5] [--compile] [--out bench/export]

A leaner bench_cpu.py (which was OOM-killed on the shared 24 GiB machine): each architecture runs
in its own child process (one ViT-B model in memory at a time), with only these variants, all
interleaved round by round on the same threads (each call after a short pause, so no variant
shares the cores with the previous one's still-spinning threads), medians and bests of the rounds:

  torch-eager          the folded zero-shot module (10 classes, uint8 in), inference_mode
  torch-compile        (--compile) the same through torch.compile; its first call per batch size
  ort-plain            the plain export, ORT defaults (`--no-fused-attention`)
  ort-mha              what `--precision fp32` ships (attention as one MultiHeadAttention op)
  ort-int8-dynamic     ort-mha + `--int8-mode dynamic`
  ort-int8-static      ort-mha + what `--precision int8` ships: calibrated static QDQ, 64 world
                       calibration images, the random-init selection (pipeline._selection_score),
                       with whatever fp32 MatMuls the search keeps on this model (reported)
  ort-int8-per-row     (--per-row) the same graph with per-row activation ranges (int8_per_row.py):
                       what the search falls back to where per-tensor ranges lose too much

at batch 1 and 16, plus the roofs (roofs.py: torch.mm / ORT MatMul / ORT MatMulInteger 2048^3) at
the start and end, and ORT's profile of the static graph at the largest batch (time by op type; the
int8 GEMMs' share bounds what rewriting any other op could still win). Writes OUT/int8_speed.json
and OUT/int8_speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))


def one_arch(arch: str, batches: list[int], threads: int, rounds: int, compile_: bool, log,
             per_row: bool = False) -> dict:
    import onnxruntime as ort
    import open_clip
    import torch

    from bench_cpu import parity, timed_alone, vit_gflop
    from clipheads.export.attention import fused_attention
    from clipheads.export.fold import fold_heads
    from clipheads.export.gate_images import world_images
    from clipheads.export.onnx_export import export_image_graph
    from clipheads.export.parity import agreement
    from clipheads.export.pipeline import _selection_score
    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated, quantize_dynamic_int8
    from clipheads.training.backbone import Backbone
    from clipheads.training.data.synth import CLASSES
    from clipheads.training.methods import TaskSpec, build_method

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = open_clip.create_model(arch, pretrained=None)
    bb = Backbone(model, open_clip.get_tokenizer(arch), arch=arch, pretrained="none")
    head = build_method("zeroshot", bb, (TaskSpec("world", tuple(CLASSES[:10])),))
    enc = fold_heads([head]).graphs[0].encoder
    res: dict = {"arch": arch, "gflop_per_image": vit_gflop(bb), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="clipheads-int8-speed-") as tmp:
        tmp = Path(tmp)
        plain = export_image_graph(enc, tmp / "plain.onnx")
        with fused_attention(bb):
            mha = export_image_graph(enc, tmp / "mha.onnx")
        dyn = quantize_dynamic_int8(mha, tmp / "int8_dynamic.onnx")
        t0 = time.perf_counter()
        recipe = Int8Recipe()
        calib = world_images(bb.preprocess, 64, seed=1).pixels
        static = tmp / "int8_static.onnx"
        rep = quantize_calibrated(mha, static, image_feeds(calib, [0]), recipe,
                                  _selection_score("random-init", recipe.target_agreement), log, tmp)
        res["quantize_static_s"] = time.perf_counter() - t0
        if per_row:  # the shipped graph rewritten as the search's per-row fallback would write it
            import onnx

            from clipheads.export.int8_per_row import per_row_activations

            graph = onnx.load(str(static))
            res["per_row_matmuls"] = per_row_activations(graph)
            onnx.save(graph, str(tmp / "int8_per_row.onnx"))
        res["int8_static"] = {k: rep[k] for k in ("kept_fp32", "kept_flops_share", "quantized_nodes",
                                                  "candidate_nodes", "search")}
        log(f"{arch}: static int8 keeps {len(rep['kept_fp32'])} MatMuls fp32 ({rep['kept_flops_share']:.1%} of FLOPs)")

        def session(path):
            o = ort.SessionOptions()
            o.intra_op_num_threads = threads
            o.log_severity_level = 3
            s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
            return lambda px: tuple(s.run(["logits", "features"], {"pixels": px, "task_index": np.zeros(len(px), np.int64)}))

        def torch_runner(mod):
            def run(px):
                with torch.inference_mode():
                    lo, f = mod(torch.from_numpy(px), torch.zeros(len(px), dtype=torch.long))
                return lo.numpy(), f.numpy()
            return run

        runners = {"torch-eager": torch_runner(enc)}
        if compile_:
            runners["torch-compile"] = torch_runner(torch.compile(enc))
        runners.update({"ort-plain": session(plain), "ort-mha": session(mha), "ort-int8-dynamic": session(dyn),
                        "ort-int8-static": session(static)})
        if per_row:
            runners["ort-int8-per-row"] = session(tmp / "int8_per_row.onnx")
        probes = world_images(bb.preprocess, 32, seed=0).pixels
        first: dict = {}
        for name, run in runners.items():  # parity (and torch.compile's compile for batch 32)
            t0 = time.perf_counter()
            got = run(probes)
            first.setdefault(name, {})["32"] = time.perf_counter() - t0
            if name == "torch-eager":
                ref = got
            res["variants"][name] = {"parity_vs_eager": {**parity(ref, got), "top1_agreement_decided_half":
                                                         agreement(ref[0], got[0])["top1_agreement_decided_half"]},
                                     "batches": {}}
        for b in batches:
            px = np.ascontiguousarray(np.resize(probes, (b,) + probes.shape[1:]))
            for name, run in runners.items():
                t0 = time.perf_counter()
                run(px)  # warm-up (torch.compile: recompile for this batch size)
                first[name][str(b)] = time.perf_counter() - t0
            times: dict[str, list[float]] = {n: [] for n in runners}
            for _ in range(rounds):  # interleaved: background load hits every variant alike
                for name, run in runners.items():
                    times[name].append(timed_alone(run, px))
            for name, ts in times.items():
                med, best = float(np.median(ts)), float(min(ts))
                res["variants"][name]["batches"][str(b)] = {"rounds": len(ts), "median_s": med, "best_s": best,
                                                            "images_per_s_median": b / med, "images_per_s_best": b / best}
            eager = res["variants"]["torch-eager"]["batches"][str(b)]["images_per_s_median"]
            log(f"{arch} b{b}: " + ", ".join(f"{n} {res['variants'][n]['batches'][str(b)]['images_per_s_median']:.1f} img/s "
                                            f"({res['variants'][n]['batches'][str(b)]['images_per_s_median'] / eager:.2f}x)"
                                            for n in runners))
        res["first_call_s"] = first
        largest = np.ascontiguousarray(np.resize(probes, (max(batches),) + probes.shape[1:]))
        res["static_profile"] = static_profile(static, largest, threads, tmp, log)
    return res


INT8_GEMM_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul")


def static_profile(path: Path, px: np.ndarray, threads: int, work: Path, log) -> dict:
    """Where the shipped int8 graph's time goes at the largest batch (ORT's profiler, by op type):
    the int8 GEMMs' share bounds what any rewrite of the other ops could still win."""
    from profile_ort import profile

    best, by_op = profile(path, {"pixels": px, "task_index": np.zeros(len(px), np.int64)}, threads, work)
    total = sum(by_op.values())
    shares = {op: ms / total for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])}
    gemm = sum(shares.get(op, 0.0) for op in INT8_GEMM_OPS)
    log(f"static int8 profile, batch {len(px)}: int8 GEMMs {gemm:.1%}, attention "
        f"{shares.get('MultiHeadAttention', 0.0):.1%}")
    return {"batch": len(px), "kernel_ms": total, "op_share": shares, "int8_gemm_share": gemm}


def write_md(r: dict, path: Path) -> None:
    from bench_cpu import machine_line

    m, r0, r1 = r["machine"], r["roofs_start"], r["roofs_end"]
    fp32_roof = max(r0["fp32_gflops"], r1["fp32_gflops"])
    int8_roof = max(r0["int8_gops"], r1["int8_gops"])
    lines = [
        "# int8 speed on ViT-B: the shipped static graph vs eager fp32 (issue 17.3, 17.4)", "",
        machine_line(m) + f"; {r['threads']} threads for every variant; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"Load average at start {r['loadavg_start']}, at end {r['loadavg_end']} (held the bench lock; other "
        "sessions' jobs may still run). Random-init open_clip models, zero-shot head (10 classes), uint8 in.", "",
        f"Roofs (2048^3, start / end): torch.mm {r0['torch_mm']['gflops']:.0f} / {r1['torch_mm']['gflops']:.0f}, "
        f"ORT MatMul {r0['ort_matmul']['gflops']:.0f} / {r1['ort_matmul']['gflops']:.0f} GFLOP/s, ORT MatMulInteger "
        f"{r0['int8_gops']:.0f} / {r1['int8_gops']:.0f} GOP/s: fp32 roof **{fp32_roof:.0f} GFLOP/s**, int8 roof "
        f"**{int8_roof:.0f} GOP/s** ({int8_roof / fp32_roof:.1f}x). Throughput is the median of {r['rounds']} "
        "interleaved rounds (best in brackets); x eager is median over median in the same run.", "",
        "| arch | variant | batch | images/s median (best) | x eager | model G(FL)OP/s | % of roof | top-1 agree (decided half) | min cos |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in r["archs"]:
        g = a["gflop_per_image"]
        for name, v in a["variants"].items():
            p = v["parity_vs_eager"]
            roof = int8_roof if "int8" in name else fp32_roof
            for b, x in v["batches"].items():
                e = a["variants"]["torch-eager"]["batches"][b]["images_per_s_median"]
                lines.append(f"| {a['arch']} ({g:.2f} GFLOP/img) | {name} | {b} | {x['images_per_s_median']:.2f} "
                             f"({x['images_per_s_best']:.2f}) | {x['images_per_s_median'] / e:.2f}x | "
                             f"{x['images_per_s_median'] * g:.0f} | {100 * x['images_per_s_median'] * g / roof:.0f}% | "
                             f"{p['top1_agreement']:.0%} ({p['top1_agreement_decided_half']:.0%}) | {p['min_feature_cosine']:.5f} |")
    lines += ["", "Where the static int8 graph's time goes (ORT profiler by op type, same run) and what that bounds:",
              "`GEMMs as measured` is the x eager if every op but the int8 GEMMs took no time; `int8 roof` if every "
              "FLOP of the model ran at the MatMulInteger roof and nothing else cost.", "",
              "| arch | batch | int8 GEMMs | attention (MHA, fp32) | next ops | x eager now | ceiling: GEMMs as measured | ceiling: int8 roof |",
              "|---|---|---|---|---|---|---|---|"]
    for a in r["archs"]:
        sp = a.get("static_profile")
        if not sp:
            continue
        b = str(sp["batch"])
        e = a["variants"]["torch-eager"]["batches"][b]["images_per_s_median"]
        i8 = a["variants"]["ort-int8-static"]["batches"][b]["images_per_s_median"]
        rest = [f"{op} {v:.1%}" for op, v in sp["op_share"].items()
                if op not in INT8_GEMM_OPS and op != "MultiHeadAttention"][:3]
        lines.append(f"| {a['arch']} | {b} | {sp['int8_gemm_share']:.1%} | {sp['op_share'].get('MultiHeadAttention', 0):.1%} "
                     f"| {', '.join(rest)} | {i8 / e:.2f}x | {i8 / sp['int8_gemm_share'] / e:.2f}x | "
                     f"{int8_roof / (e * a['gflop_per_image']):.2f}x |")
    lines += ["", "Notes:"]
    for a in r["archs"]:
        s = a["int8_static"]
        lines.append(f"- {a['arch']}: ort-int8-static keeps {len(s['kept_fp32'])} MatMuls fp32 "
                     f"({100 * s['kept_flops_share']:.1f}% of the quantizable FLOPs): "
                     + ", ".join(f"{k['node']} ({k['reason']})" for k in s["kept_fp32"])
                     + f"; {s['quantized_nodes']} of {s['candidate_nodes']} int8; search "
                     + ", ".join(f"keep {t['kept_sensitive']}: {t['calibration_score']:.4f}" for t in s["search"])
                     + f"; quantize {a['quantize_static_s']:.0f} s; first call per batch size (s): "
                     + json.dumps({k: {b: round(t, 2) for b, t in v.items()} for k, v in a["first_call_s"].items()}))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--per-row", action="store_true", help="also the per-row activation variant")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--model-configs", default=None, help="extra open_clip config dir (e.g. tests/model_configs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one arch, JSON to this path
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(msg):
        print(f"[int8-speed] {msg}", file=sys.stderr, flush=True)

    if args.model_configs:
        import open_clip

        open_clip.add_model_config(args.model_configs)
    if args.child:
        res = one_arch(args.archs[0], args.batches, args.threads, args.rounds, args.compile, log, args.per_row)
        Path(args.child).write_text(json.dumps(res))
        return 0
    from bench_cpu import close_run, run_header, save_run

    r = run_header(args.threads, rounds=args.rounds)
    for arch in args.archs:  # a child each: one ViT-B in memory at a time, freed before the next
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--archs", arch, "--threads", str(args.threads), "--rounds",
                   str(args.rounds), "--child", f.name, "--batches", *map(str, args.batches)]
            cmd += ["--model-configs", args.model_configs] if args.model_configs else []
            subprocess.run(cmd + (["--compile"] if args.compile else []) + (["--per-row"] if args.per_row else []),
                           check=True)
            r["archs"].append(json.loads(Path(f.name).read_text()))
    close_run(r, args.threads)
    save_run(r, args.out, "int8_speed", write_md, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
