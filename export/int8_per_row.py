"""Per-row (per-token) activation ranges for a fused static int8 graph (issue 17.3 quality).

A static graph quantizes each MatMul's input with one calibrated range for the whole tensor, so a
token with small values shares its 256 levels with the largest token of any image. Measured on
the tiny CLIP (bench/export/int8_world.md), that is most of the int8 error; ranges per row, taken
at run time, remove most of it. ORT's int8 GEMMs take one activation zero point per tensor only,
so `per_row_activations` rewrites, for every fused `MatMulIntegerToFloat(QuantizeLinear(x), w_q)`
with symmetric weights (zero point 0, as our recipe writes them):

    x2      = Reshape(x, [-1, K])                                   rows: tokens of every image
    lo, hi  = min(ReduceMin(x2, 1), 0), max(ReduceMax(x2, 1), 0)   0 stays exactly representable
    s       = max((hi - lo) / 255, eps);  z = Round(-lo / s)        per row, z in [0, 255]
    x_q     = [QuantizeLinear(x2, s, z, axis=0) | z repeated m times]   (R, K + m) uint8
    w_zp    = [w_q ; E],  E (m, N) int8 with column sums -colsum(w_q)   (zero_point_rows)
    out     = s * MatMulIntegerToFloat(x_q, w_zp, 1, w_scale, 0, 0) + bias

The m extra columns subtract z * colsum(w_q) inside the int8 GEMM (m = max |colsum| / 127, 1-4%
of K here), so the zero point costs no pass over the float output. That is exactly
`dequant(x_q) @ dequant(w_q) + bias` with x_q per row (tested against numpy). Readers of one input
(q, k, v) share its quantization. The cost is two reductions and a quantize over the input and two
element-wise passes over each output: a recipe for accuracy, chosen by the quantizer's search only
when per-tensor ranges cannot reach the target (`quantize.py`).
"""
from __future__ import annotations

import numpy as np

from .int8_fuse import MS_DOMAIN

_EPS = 1e-12


def _init(graph, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    if name not in {i.name for i in graph.initializer}:
        graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _row_quantizer(graph, x: str, k: int, p: str) -> tuple[list, str, str, str, str]:
    """Nodes that quantize x per row -> (nodes, x_q (R, K), scale (R, 1), zero point (R, 1) uint8, lead shape)."""
    from onnx import helper

    c = lambda n, v, dt=np.float32: _init(graph, n, np.asarray(v, dt))  # noqa: E731
    zero, c255, eps = c("pr_zero", 0.0), c("pr_255", 255.0), c("pr_eps", _EPS)
    flat, lead_end = c(f"pr_shape_{k}", [-1, k], np.int64), c("pr_minus1", [-1], np.int64)
    start, col = c("pr_start0", [0], np.int64), c("pr_col", [-1, 1], np.int64)
    nodes = [
        helper.make_node("Reshape", [x, flat], [p + "x2"]),
        helper.make_node("ReduceMin", [p + "x2"], [p + "mn"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", [p + "x2"], [p + "mx"], axes=[1], keepdims=0),
        helper.make_node("Min", [p + "mn", zero], [p + "lo"]),
        helper.make_node("Max", [p + "mx", zero], [p + "hi"]),
        helper.make_node("Sub", [p + "hi", p + "lo"], [p + "rg"]),
        helper.make_node("Div", [p + "rg", c255], [p + "s0"]),
        helper.make_node("Max", [p + "s0", eps], [p + "s"]),
        helper.make_node("Div", [p + "lo", p + "s"], [p + "nz"]),
        helper.make_node("Neg", [p + "nz"], [p + "z0"]),
        helper.make_node("Round", [p + "z0"], [p + "zf"]),  # in [0, 255]: lo <= 0 <= hi
        helper.make_node("Cast", [p + "zf"], [p + "zu8"], to=2),  # uint8
        helper.make_node("QuantizeLinear", [p + "x2", p + "s", p + "zu8"], [p + "xq"], axis=0),
        helper.make_node("Reshape", [p + "s", col], [p + "scol"]),
        helper.make_node("Reshape", [p + "zu8", col], [p + "zcol"]),
        helper.make_node("Shape", [x], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", start, lead_end], [p + "lead"]),
    ]
    return nodes, p + "xq", p + "scol", p + "zcol", p + "lead"


def zero_point_rows(colsum: np.ndarray, rows: int) -> np.ndarray:
    """(rows, N) int8 whose column sums are -colsum: B's extra rows that, against x_q's extra
    columns holding the row's zero point z, subtract z * colsum(w_q) inside the int8 GEMM."""
    q, r = np.divmod(-colsum.astype(np.int64), rows)  # rows * 127 >= max |colsum|: every entry fits int8
    return (q[None, :] + (np.arange(rows)[:, None] < r[None, :])).astype(np.int8)


def _eligible(g, inits, producer) -> list[tuple]:
    """(node, x, w_q int64 (K, N)) of every fused int8 MatMul fed by a QuantizeLinear, weights symmetric."""
    from onnx import numpy_helper

    out = []
    for mm in g.node:
        if mm.op_type != "MatMulIntegerToFloat" or mm.domain != MS_DOMAIN:
            continue
        q = producer.get(mm.input[0])
        w_q, w_zero = inits.get(mm.input[1]), inits.get(mm.input[5]) if len(mm.input) > 5 else None
        if q is None or q.op_type != "QuantizeLinear" or w_q is None or len(w_q.dims) != 2:
            continue
        if w_zero is not None and np.any(numpy_helper.to_array(w_zero)):
            continue  # asymmetric weights: the zero-point rows below assume zero points of 0
        out.append((mm, q.input[0], numpy_helper.to_array(w_q).astype(np.int64)))
    return out


def per_row_activations(model) -> int:
    """Rewrite in place (see the module docstring); returns the number of MatMuls rewritten."""
    from onnx import helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    found = _eligible(g, inits, producer)
    extra: dict[str, int] = {}  # x -> zero-point columns its readers need (the most of any reader)
    for _, x, wq in found:
        extra[x] = max(extra.get(x, 1), int(np.ceil(np.abs(wq.sum(axis=0)).max() / 127.0)))
    one = _init(g, "pr_one", np.asarray(1.0, np.float32))
    u8_zero = _init(g, "pr_u8_zero", np.asarray(0, np.uint8))
    quantizers: dict[str, tuple[str, str, str]] = {}  # x -> (x_q with zero-point columns, scale, lead shape)
    before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    replace: dict[int, list] = {}
    for mm, x, wq in found:
        k, n = wq.shape
        p = f"{mm.name}_pr_"
        if x not in quantizers:  # the first reader of x builds its quantizer
            px = f"{x}_pr_"
            nodes, x_q, scale, zero_u8, lead = _row_quantizer(g, x, k, px)
            reps = _init(g, f"pr_tile_{extra[x]}", np.asarray([1, extra[x]], np.int64))
            nodes += [helper.make_node("Tile", [zero_u8, reps], [px + "ztile"]),
                      helper.make_node("Concat", [x_q, px + "ztile"], [px + "xqz"], axis=1)]
            quantizers[x] = (px + "xqz", scale, lead)
            before.setdefault(id(mm), []).extend(nodes)
        x_q, scale, lead = quantizers[x]
        w_aug = np.concatenate([wq, zero_point_rows(wq.sum(axis=0), extra[x])]).astype(np.int8)
        w_name = _init(g, p + "w_zp", w_aug)
        out_shape = _init(g, f"pr_width_{n}", np.asarray([n], np.int64))
        nodes = [helper.make_node("MatMulIntegerToFloat", [x_q, w_name, one, mm.input[3], u8_zero] + list(mm.input[5:6]),
                                  [p + "y"], name=mm.name, domain=MS_DOMAIN),
                 helper.make_node("Mul", [p + "y", scale], [p + "ys"])]
        y = p + "ys"
        if len(mm.input) > 6 and mm.input[6]:
            nodes.append(helper.make_node("Add", [y, mm.input[6]], [p + "yb"]))
            y = p + "yb"
        nodes += [helper.make_node("Concat", [lead, out_shape], [p + "oshape"], axis=0),
                  helper.make_node("Reshape", [y, p + "oshape"], [mm.output[0]])]
        replace[id(mm)] = nodes
    if not replace:
        return 0
    new = []
    for node in g.node:
        new.extend(before.get(id(node), []))
        new.extend(replace.get(id(node), [node]))
    used = {i for nd in new for i in nd.input} | {o.name for o in g.output}
    new = [nd for nd in new if not (nd.op_type == "QuantizeLinear" and nd.output[0] not in used)]
    del g.node[:]
    g.node.extend(new)
    used = {i for nd in new for i in nd.input} | {o.name for o in g.output}
    live = [i for i in g.initializer if i.name in used]  # the per-tensor scales/zero points left unread
    del g.initializer[:]
    g.initializer.extend(live)
    return len(replace)
