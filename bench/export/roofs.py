"""The CPU roofs every % of peak in bench/export is measured against (issue 17.4).

    .venv/bin/python bench/export/roofs.py [--threads 2] [--rounds 5] [--out bench/export]

fp32: torch.mm and an ONNX Runtime MatMul of the same 2048^3 product (MLAS SGEMM); the fp32 roof
is the faster one. int8: ORT MatMulInteger uint8 x int8 of the same size (MLAS's VNNI kernel).
Rounds are interleaved (each round times all three once; the best round of each is reported:
contention only adds time). Writes OUT/roofs.json and OUT/roofs.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args(argv)
    from bench_cpu import gemm_peak, machine, machine_line, ort_matmul_roof

    res = {"machine": machine(), "threads": args.threads, "started_unix": int(time.time()),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()], "rounds": []}
    for r in range(args.rounds):
        row = {"torch_mm": gemm_peak(args.threads, seconds=args.seconds)["gflops"],
               "ort_matmul": ort_matmul_roof(args.threads, seconds=args.seconds)["gflops"],
               "ort_matmul_integer": ort_matmul_roof(args.threads, seconds=args.seconds, int8=True)["gflops"]}
        res["rounds"].append(row)
        print(f"[roofs] round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()), file=sys.stderr, flush=True)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    best = {k: max(r[k] for r in res["rounds"]) for k in res["rounds"][0]}
    res["best"] = best
    res["fp32_roof_gflops"] = max(best["torch_mm"], best["ort_matmul"])
    res["int8_roof_gops"] = best["ort_matmul_integer"]
    out = Path(args.out)
    (out / "roofs.json").write_text(json.dumps(res, indent=1))
    m = res["machine"]
    lines = ["# CPU roofs (2048^3, interleaved rounds, best of each)", "",
             machine_line(m) + f"; {args.threads} threads; load {res['loadavg_start']} -> "
             f"{res['loadavg_end']} (shared with other engineers' jobs: absolute numbers are pessimistic, the "
             "ratios between the three, measured in the same rounds, are what this file is for).", "",
             "| round | torch.mm GFLOP/s | ORT MatMul GFLOP/s | ORT MatMulInteger GOP/s |", "|---|---|---|---|"]
    for i, r in enumerate(res["rounds"], 1):
        lines.append(f"| {i} | {r['torch_mm']:.0f} | {r['ort_matmul']:.0f} | {r['ort_matmul_integer']:.0f} |")
    lines += [f"| **best** | **{best['torch_mm']:.0f}** | **{best['ort_matmul']:.0f}** | **{best['ort_matmul_integer']:.0f}** |",
              "", f"fp32 roof = max(torch.mm, ORT MatMul) = **{res['fp32_roof_gflops']:.0f} GFLOP/s** "
              f"(ORT / torch = {best['ort_matmul'] / best['torch_mm']:.2f}x); int8 roof = ORT MatMulInteger = "
              f"**{res['int8_roof_gops']:.0f} GOP/s** ({res['int8_roof_gops'] / res['fp32_roof_gflops']:.1f}x the fp32 "
              "roof). `bench_cpu.py` measures the same roofs at the start and end of its run and states every "
              "% of peak against them."]
    (out / "roofs.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
