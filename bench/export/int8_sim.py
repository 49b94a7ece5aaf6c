"""Simulated ("fake") int8 graphs for bench_int8_world.py: where the int8 error comes from (issue 17.3).

Each variant is the fp32 graph with int8 rounding emulated in fp32 ops on the transformer blocks'
MatMuls (every MatMul with constant weights except the one-row-per-image ones), so one source of
error can be switched on at a time, and schemes ORT's int8 kernels cannot run can be measured:

  sim-weights-only    weights rounded to int8 per output channel, activations fp32
  sim-acts-only       activations rounded to uint8 per tensor (calibrated min/max), weights fp32
  sim-static          both: what the real static QDQ graph computes (a check on the simulation)
  sim-per-row-asym    weights int8 + activations uint8 with a min/max *per row* (token) at run
                      time: ORT's MatMulInteger / MatMulIntegerToFloat refuse a per-row zero point
                      ("must be a scalar or 1D tensor of size 1"), so no real graph runs this
  sim-per-row-sym     the same, symmetric per row (max |x| / 127): runnable as u8 with zero point
                      128 and a per-row scale applied after MatMulIntegerToFloat
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

SIM_RECIPES = ("sim-weights-only", "sim-acts-only", "sim-static", "sim-per-row-asym", "sim-per-row-sym")


def _const(m, name: str, value) -> str:
    from onnx import numpy_helper

    if name not in {i.name for i in m.graph.initializer}:
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name


def _insert_before(m, node, new_nodes, out: str) -> None:
    idx = list(m.graph.node).index(node)
    for k, n in enumerate(new_nodes):
        m.graph.node.insert(idx + k, n)
    node.input[0] = out


def _act_per_tensor(m, node, lo: float, hi: float) -> None:
    from onnx import helper, numpy_helper

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    p = node.name + "_sim_"
    m.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), p + "s"),
                                numpy_helper.from_array(np.array(int(round(-lo / scale)), np.uint8), p + "z")])
    _insert_before(m, node, [helper.make_node("QuantizeLinear", [node.input[0], p + "s", p + "z"], [p + "q"]),
                             helper.make_node("DequantizeLinear", [p + "q", p + "s", p + "z"], [p + "dq"])], p + "dq")


def _act_per_row(m, node, symmetric: bool) -> None:
    from onnx import helper

    x, p = node.input[0], node.name + "_sim_"
    eps, zero = _const(m, "sim_eps", 1e-12), _const(m, "sim_zero", 0.0)
    if symmetric:
        c127, cm127 = _const(m, "sim_127", 127.0), _const(m, "sim_m127", -127.0)
        ns = [helper.make_node("Abs", [x], [p + "ab"]),
              helper.make_node("ReduceMax", [p + "ab"], [p + "mx"], axes=[-1], keepdims=1),
              helper.make_node("Div", [p + "mx", c127], [p + "s0"]), helper.make_node("Max", [p + "s0", eps], [p + "s"]),
              helper.make_node("Div", [x, p + "s"], [p + "xs"]), helper.make_node("Round", [p + "xs"], [p + "xr"]),
              helper.make_node("Clip", [p + "xr", cm127, c127], [p + "q"]),
              helper.make_node("Mul", [p + "q", p + "s"], [p + "dq"])]
    else:
        c255 = _const(m, "sim_255", 255.0)
        ns = [helper.make_node("ReduceMin", [x], [p + "mn"], axes=[-1], keepdims=1),
              helper.make_node("ReduceMax", [x], [p + "mx"], axes=[-1], keepdims=1),
              helper.make_node("Min", [p + "mn", zero], [p + "lo"]), helper.make_node("Max", [p + "mx", zero], [p + "hi"]),
              helper.make_node("Sub", [p + "hi", p + "lo"], [p + "rg"]), helper.make_node("Div", [p + "rg", c255], [p + "s0"]),
              helper.make_node("Max", [p + "s0", eps], [p + "s"]), helper.make_node("Div", [p + "lo", p + "s"], [p + "lz"]),
              helper.make_node("Round", [p + "lz"], [p + "z"]),  # -zero point (<= 0)
              helper.make_node("Div", [x, p + "s"], [p + "xs"]), helper.make_node("Round", [p + "xs"], [p + "xr"]),
              helper.make_node("Sub", [p + "xr", p + "z"], [p + "q0"]),
              helper.make_node("Clip", [p + "q0", zero, c255], [p + "q"]),
              helper.make_node("Add", [p + "q", p + "z"], [p + "d0"]), helper.make_node("Mul", [p + "d0", p + "s"], [p + "dq"])]
    _insert_before(m, node, ns, p + "dq")


def simulate(src: str | Path, dst: str | Path, recipe: str, calib_feeds: Sequence[dict]) -> dict:
    """Write the simulated graph `recipe` (SIM_RECIPES) of `src` to `dst`; returns what was simulated."""
    import onnx
    from onnx import numpy_helper

    from clipheads.export.int8_candidates import candidates, fake_quant_weight, measure_local_errors, probe

    if recipe not in SIM_RECIPES:
        raise ValueError(f"unknown simulation {recipe!r}")
    model = onnx.load(str(src))
    cands = candidates(model, patch_embedding=False)  # the emulation rounds MatMuls only (the patch Conv stays fp32)
    with tempfile.TemporaryDirectory(prefix="clipheads-int8-sim-") as tmp:
        measure_local_errors(Path(src), model, cands, calib_feeds, Path(tmp))
        blocks = [c for c in cands if c.rows_per_image > 1.0 + 1e-9]
        lo, hi, _, _, _ = probe(model, [c.activation for c in blocks], calib_feeds, Path(tmp), keep_batches=0)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    weights = recipe != "sim-acts-only"
    for c in blocks:
        if weights and c.weight in inits:
            w = numpy_helper.to_array(inits[c.weight]).astype(np.float32)
            inits[c.weight].CopyFrom(numpy_helper.from_array(fake_quant_weight(w, False), c.weight))
        node = nodes[c.node]
        if recipe in ("sim-acts-only", "sim-static"):
            _act_per_tensor(model, node, lo[c.activation], hi[c.activation])
        elif recipe.startswith("sim-per-row"):
            _act_per_row(model, node, symmetric=recipe == "sim-per-row-sym")
    onnx.save(model, str(dst))
    total = sum(c.flops_per_image for c in cands) or 1.0
    return {"simulated_nodes": len(blocks), "fp32_flops_share": round(1 - sum(c.flops_per_image for c in blocks) / total, 6)}
