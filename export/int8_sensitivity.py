"""End-to-end int8 sensitivity of each candidate, measured on the logits (issue 17.3).

The search's first ranking is each MatMul's own output error under quantization
(`Candidate.local_error`, `int8_candidates.py`). What a layer's error does to the *logits* also depends on everything
after it (a LayerNorm that rescales it, a residual stream that dwarfs it, the class matrix), so the
search can keep the wrong layers in fp32. `logit_sensitivity` measures, for every candidate, the
logit error when it alone is int8 and every other layer stays fp32, with one ONNX Runtime session
for all candidates: each candidate's input x and weights W become

    x' = x + s_i (fq(x) - x)          W' = W + s_i (W_q - W)          s = one-hot `int8_switch`

where fq is the rounding the shipped graph will apply (uint8 per tensor with the calibrated range,
or per row with each token's own range at run time, exactly as `int8_per_row.py` computes it) and
W_q the int8 weights it will carry (GPTQ-rounded or nearest, dequantized); a patch Conv's output
is rounded too, as QLinearConv's is. One pass over the sensitivity images per candidate and
activation-range mode; the fp32 graph is s = 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .int8_candidates import constant_weights, fake_quant_weight, ort_session

SWITCH = "int8_switch"


def _const(graph, name: str, value) -> str:
    from onnx import numpy_helper

    if name not in {i.name for i in graph.initializer}:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _per_tensor(graph, x: str, lo: float, hi: float, p: str) -> tuple[list, str]:
    """fq(x) with one calibrated range: uint8, 0 exactly representable (ORT's MinMax recipe)."""
    from onnx import helper

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    s = _const(graph, p + "scale", np.float32(scale))
    z = _const(graph, p + "zero", np.uint8(np.clip(np.round(-lo / scale), 0, 255)))
    return [helper.make_node("QuantizeLinear", [x, s, z], [p + "q"]),
            helper.make_node("DequantizeLinear", [p + "q", s, z], [p + "fq"])], p + "fq"


def _per_row(graph, x: str, k: int, p: str) -> tuple[list, str]:
    """fq(x) with each row's (token's) own range: int8_per_row.py's own quantizer, dequantized."""
    from onnx import helper

    from .int8_per_row import _row_quantizer

    nodes, x_q, _, _, _ = _row_quantizer(graph, x, k, p)
    return nodes + [helper.make_node("DequantizeLinear", [x_q, p + "s", p + "zu8"], [p + "dq"], axis=0),
                    helper.make_node("Shape", [x], [p + "xshape"]),
                    helper.make_node("Reshape", [p + "dq", p + "xshape"], [p + "fq"])], p + "fq"


def int8_weights(model, cands: Sequence, rounding: Optional[dict]) -> dict[str, np.ndarray]:
    """Each candidate's weights as its int8 graph will carry them, dequantized and shaped like its
    B; with GPTQ the integers go into `rounding["cache"]`, which the search's
    graphs then reuse (`int8_gptq.round_weights`)."""
    from .int8_gptq import gptq_round

    trans = {n.name: any(a.name == "transB" and a.i for a in n.attribute) for n in model.graph.node}
    out = {}
    for c in cands:
        w = constant_weights(model, c.weight)
        if rounding and c.node in rounding["weights"] and c.node in rounding["grams"]:
            amax = np.abs(w).max(axis=0).astype(np.float32)
            scale = np.maximum((amax + amax) / np.float32(254.0), np.float32(1e-12))  # ORT's symmetric per-channel
            q = rounding["cache"].setdefault(c.node, gptq_round(w, rounding["grams"][c.node], scale))
            out[c.node] = q.astype(np.float32) * scale
        elif c.kind == "Conv":  # (D, C, p, p): per output channel, the first axis
            out[c.node] = fake_quant_weight(w.reshape(len(w), -1).T, False).T.reshape(w.shape)
        else:
            out[c.node] = fake_quant_weight(w, trans.get(c.node, False))
    return out


def ranking_feeds(fp32, feeds: Sequence[dict], n_cands: int, images: int, budget_s: float) -> list[dict]:
    """The first `images` of `feeds`, or fewer (>= 8) so that one pass per candidate fits
    `budget_s` at the fp32 session's measured speed (the switched graph runs a little slower). How
    many were used is the int8 report's `sensitivity_images_used` (the recipe's number is only the cap)."""
    import time

    t0 = time.perf_counter()
    fp32.run(["logits"], feeds[0])
    per_image = (time.perf_counter() - t0) / max(len(feeds[0]["pixels"]), 1)
    n = int(min(images, max(8, budget_s / max(n_cands * per_image, 1e-9))))
    out, have = [], 0
    for f in feeds:
        if have >= n:
            break
        take = min(len(f["pixels"]), n - have)
        out.append({k: v[:take] for k, v in f.items()})
        have += take
    return out


def switched_graph(model, cands: Sequence, activations: str, ranges: Mapping[str, tuple[float, float]],
                   weights_q: Mapping[str, np.ndarray]):
    """A copy of `model` in which candidate i is int8 exactly when `int8_switch[i]` is 1.
    `ranges`: {activation tensor: (lo, hi)} for per-tensor rounding (and for Convs, which are per
    tensor either way); `weights_q`: {node: dequantized int8 weights, shaped like the node's B}."""
    import onnx
    from onnx import helper


    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    g.input.append(helper.make_tensor_value_info(SWITCH, onnx.TensorProto.FLOAT, [len(cands)]))
    nodes = {n.name: n for n in g.node}
    before: dict[str, list] = {}  # node name -> nodes to insert before it
    after: dict[str, list] = {}  # ... after it (a patch Conv's output quantization)
    deltas: dict[str, str] = {}  # (activation, mode) -> fq(x) - x, shared by the readers of x (q, k, v)
    for i, c in enumerate(cands):
        node, p = nodes[c.node], f"{c.node}_sens_"
        idx = _const(g, f"sens_idx_{i}", np.asarray([i], np.int64))
        new = [helper.make_node("Gather", [SWITCH, idx], [p + "s"], axis=0)]
        mode = "per-tensor" if activations == "per-tensor" or c.kind == "Conv" else "per-row"
        key = f"{c.activation}|{mode}"
        if key not in deltas:
            px = f"{c.activation}_sens_{mode}_"
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = weights_q[c.node].shape[1 if trans_b else 0]  # B is (K, N), or (N, K) for a transposing Gemm
            fq_nodes, fq = (_per_tensor(g, c.activation, *ranges[c.activation], px) if mode == "per-tensor"
                            else _per_row(g, c.activation, k, px))
            new += fq_nodes + [helper.make_node("Sub", [fq, c.activation], [px + "delta"])]
            deltas[key] = px + "delta"
        dw = _const(g, p + "dw", (weights_q[c.node] - constant_weights(model, c.weight)).astype(np.float32))
        new += [helper.make_node("Mul", [deltas[key], p + "s"], [p + "xd"]),
                helper.make_node("Add", [c.activation, p + "xd"], [p + "x"]),
                helper.make_node("Mul", [dw, p + "s"], [p + "wd"]),
                helper.make_node("Add", [c.weight, p + "wd"], [p + "w"])]
        before[c.node] = new
        node.input[0], node.input[1] = p + "x", p + "w"
        if c.kind == "Conv":  # QLinearConv writes uint8: its output is rounded to the calibrated range too
            y = node.output[0]
            node.output[0] = p + "y"
            fq_nodes, fq = _per_tensor(g, p + "y", *c.output_range, p + "out_")
            after[c.node] = fq_nodes + [helper.make_node("Sub", [fq, p + "y"], [p + "yd"]),
                                        helper.make_node("Mul", [p + "yd", p + "s"], [p + "yds"]),
                                        helper.make_node("Add", [p + "y", p + "yds"], [y])]
    order = []
    for n in g.node:
        order.extend(before.get(n.name, []))
        order.append(n)
        order.extend(after.get(n.name, []))
    del g.node[:]
    g.node.extend(order)
    return out


def logit_sensitivity(model, cands: Sequence, feeds: Sequence[dict], ref: np.ndarray, activations: str,
                      ranges: Mapping[str, tuple[float, float]], weights_q: Mapping[str, np.ndarray],
                      work: Path) -> list[float]:
    """RMS logit error against `ref` (the fp32 logits of `feeds`) with each candidate alone int8."""
    import onnx


    path = Path(work) / f"sensitivity_{activations}.onnx"
    onnx.save(switched_graph(model, cands, activations, ranges, weights_q), str(path))
    sess = ort_session(path)
    out = []
    for i in range(len(cands)):
        switch = np.zeros(len(cands), np.float32)
        switch[i] = 1.0
        got = np.concatenate([sess.run(["logits"], {**f, SWITCH: switch})[0] for f in feeds])
        out.append(float(np.sqrt(np.mean((got - ref) ** 2))))
    return out
