"""Would an int8 attention core speed up the int8 graph? (issue 17.3 speed half)

    .venv/bin/python bench/export/attention_int8.py [--tokens 197] [--batch 16] [--rounds 7]

In the shipped static int8 ViT-B/16 graph the projections are int8 GEMMs and the attention core
(softmax(q k^T / sqrt(d)) v) runs in fp32 inside ORT's fused MultiHeadAttention. This measures one
layer's core at ViT-B shapes, all interleaved round by round on the same threads:

  mha              ORT's MultiHeadAttention (what the int8 graph ships)
  fp32-unfused     Reshape/Transpose, MatMul, Softmax, MatMul (the plain export's core)
  int8-qk          q and k quantized per tensor at run time (DynamicQuantizeLinear, then the uint8
                   transposed), q k^T as MatMulInteger, softmax and p v in fp32
  int8-qk-pv       also p v as MatMulInteger (p on a fixed 1/255 grid, v quantized at run time)

and each one's max |diff| against the fp32 core (q, k, v ~ N(0, 1)). Writes OUT/attention_int8.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

F, U8, I64 = 1, 2, 7  # onnx TensorProto element types used below


def core_graph(variant: str, heads: int, width: int):
    """One attention core as an ONNX model: q, k, v (B, N, width) fp32 -> out (B, N, width)."""
    from onnx import helper as h

    d = width // heads
    nodes, inits = [], [
        h.make_tensor("split_shape", I64, [4], [0, 0, heads, d]),
        h.make_tensor("merge_shape", I64, [3], [0, 0, width]),
        h.make_tensor("inv_sqrt_d", F, [], [1.0 / np.sqrt(d)]),
        h.make_tensor("p_scale", F, [], [1.0 / 255]),
        h.make_tensor("p_zero", U8, [], [0]),
    ]

    def heads_of(x: str, perm: list[int]) -> str:
        nodes.append(h.make_node("Reshape", [x, "split_shape"], [x + "_4d"]))
        nodes.append(h.make_node("Transpose", [x + "_4d"], [x + "_t"], perm=perm))
        return x + "_t"

    def quantized(x: str) -> tuple[str, str, str]:  # per-tensor uint8 at run time
        nodes.append(h.make_node("DynamicQuantizeLinear", [x], [x + "_u8", x + "_s", x + "_z"]))
        return x + "_u8", x + "_s", x + "_z"

    if variant == "mha":
        nodes.append(h.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft",
                                 num_heads=heads))
    else:
        if variant == "fp32-unfused":
            scores = "scores"
            nodes.append(h.make_node("MatMul", [heads_of("q", [0, 2, 1, 3]), heads_of("k", [0, 2, 3, 1])], ["qk"]))
            nodes.append(h.make_node("Mul", ["qk", "inv_sqrt_d"], [scores]))
        else:
            (qu, qs, qz), (ku, ks, kz) = quantized("q"), quantized("k")
            nodes.append(h.make_node("MatMulInteger", [heads_of(qu, [0, 2, 1, 3]), heads_of(ku, [0, 2, 3, 1]), qz, kz],
                                     ["qk_i32"]))
            nodes.append(h.make_node("Cast", ["qk_i32"], ["qk_f"], to=F))
            nodes.append(h.make_node("Mul", [qs, ks], ["qks"]))
            nodes.append(h.make_node("Mul", ["qks", "inv_sqrt_d"], ["qk_scale"]))
            nodes.append(h.make_node("Mul", ["qk_f", "qk_scale"], ["scores"]))
        nodes.append(h.make_node("Softmax", ["scores"], ["p"], axis=-1))
        if variant == "int8-qk-pv":
            nodes.append(h.make_node("QuantizeLinear", ["p", "p_scale", "p_zero"], ["p_u8"]))
            vu, vs, vz = quantized("v")
            nodes.append(h.make_node("MatMulInteger", ["p_u8", heads_of(vu, [0, 2, 1, 3]), "p_zero", vz], ["pv_i32"]))
            nodes.append(h.make_node("Cast", ["pv_i32"], ["pv_f"], to=F))
            nodes.append(h.make_node("Mul", [vs, "p_scale"], ["pv_scale"]))
            nodes.append(h.make_node("Mul", ["pv_f", "pv_scale"], ["pv"]))
        else:
            nodes.append(h.make_node("MatMul", ["p", heads_of("v", [0, 2, 1, 3])], ["pv"]))
        nodes.append(h.make_node("Transpose", ["pv"], ["pv_t"], perm=[0, 2, 1, 3]))
        nodes.append(h.make_node("Reshape", ["pv_t", "merge_shape"], ["out"]))
    io = [h.make_tensor_value_info(n, F, ["B", "N", width]) for n in ("q", "k", "v")]
    graph = h.make_graph(nodes, variant, io, [h.make_tensor_value_info("out", F, ["B", "N", width])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])


def main(argv=None) -> int:
    import onnxruntime as ort

    from bench_cpu import machine, machine_line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[197, 50], help="ViT-B/16 and ViT-B/32 at 224 px")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    variants = ["mha", "fp32-unfused", "int8-qk", "int8-qk-pv"]
    rng = np.random.default_rng(0)
    res = {"machine": machine(), "threads": args.threads, "batch": args.batch, "heads": args.heads,
           "width": args.width, "rounds": args.rounds, "loadavg_start": [round(x, 2) for x in os.getloadavg()], "tokens": {}}
    for n in args.tokens:
        feed = {x: rng.standard_normal((args.batch, n, args.width), dtype=np.float32) for x in ("q", "k", "v")}
        sessions = {}
        for v in variants:
            o = ort.SessionOptions()
            o.intra_op_num_threads = args.threads
            o.log_severity_level = 3
            # idle intra-op threads sleep: with several sessions interleaved, one's spinning pool
            # would steal the cores from the next (medians 1.5-4x their bests otherwise)
            o.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[v] = ort.InferenceSession(core_graph(v, args.heads, args.width).SerializeToString(), o,
                                               providers=["CPUExecutionProvider"])
        ref = sessions["fp32-unfused"].run(None, feed)[0]
        out: dict = {}
        bound = {}
        for v, s in sessions.items():
            got = s.run(None, feed)[0]
            out[v] = {"max_abs_diff": float(np.abs(got - ref).max()), "ref_abs_max": float(np.abs(ref).max()),
                      "times_s": []}
            b = s.io_binding()  # inputs bound once, output preallocated: the timing is the core alone
            for name, x in feed.items():
                b.bind_cpu_input(name, x)
            b.bind_output("out", "cpu")
            s.run_with_iobinding(b)
            bound[v] = b
        for _ in range(args.rounds):  # interleaved: background load hits every variant alike
            for v, s in sessions.items():
                t0 = time.perf_counter()
                s.run_with_iobinding(bound[v])
                out[v]["times_s"].append(time.perf_counter() - t0)
        for v in variants:
            out[v]["median_ms"] = 1000 * float(np.median(out[v]["times_s"]))
            out[v]["best_ms"] = 1000 * float(min(out[v]["times_s"]))
        res["tokens"][str(n)] = out
        print(f"N={n}: " + ", ".join(f"{v} {out[v]['median_ms']:.2f} ms" for v in variants), file=sys.stderr)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    outdir = Path(args.out)
    (outdir / "attention_int8.json").write_text(json.dumps(res, indent=1))
    m = res["machine"]
    lines = ["# An int8 attention core vs ORT's fused fp32 MultiHeadAttention (issue 17.3)", "",
             machine_line(m) + f"; {args.threads} threads; load average {res['loadavg_start']} -> {res['loadavg_end']}. One layer's core "
             f"(softmax(q k^T / sqrt(d)) v), batch {args.batch}, {args.heads} heads x {args.width // args.heads}, "
             f"q, k, v ~ N(0, 1); median of {args.rounds} interleaved rounds (best in brackets).", "",
             "| tokens | variant | ms per layer | x mha | max abs diff vs fp32 (output max) |", "|---|---|---|---|---|"]
    for n, out in res["tokens"].items():
        for v in variants:
            x = out[v]
            lines.append(f"| {n} | {v} | {x['median_ms']:.2f} ({x['best_ms']:.2f}) | "
                         f"{out['mha']['median_ms'] / x['median_ms']:.2f}x | {x['max_abs_diff']:.2e} ({x['ref_abs_max']:.2f}) |")
    (outdir / "attention_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
