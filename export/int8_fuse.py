"""Offline fusion of a static QDQ graph's int8 MatMuls with their bias (issue 17.3 speed).

ONNX Runtime turns `DequantizeLinear(x_q) @ DequantizeLinear(w_q)` into one MatMulIntegerToFloat
when it loads the graph, but leaves the bias `Add` after it as a separate pass over the output
(7% of the static int8 ViT-B/32's time). MatMulIntegerToFloat takes the bias as its 7th input, so
`fuse_int8_matmuls` rewrites

    Q(x) -> DQ -> MatMul <- DQ <- w_q        (+ Add(bias) when the MatMul's only reader adds a constant
                                               vector of its output width)

as `com.microsoft.MatMulIntegerToFloat(x_q, w_q, x_scale, w_scale, x_zero, w_zero[, bias])`: the
same arithmetic ORT would run, with the bias added in the GEMM's output pass. DequantizeLinear
nodes left without readers are dropped. The graph then needs ONNX Runtime (CPU), which is the
only runtime int8 bundles name.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

MS_DOMAIN = "com.microsoft"


def _readers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    for o in graph.output:
        out.setdefault(o.name, []).append(None)  # a graph output: never fused away
    return out


def _bias(add, y: str, inits: dict, width: int) -> Optional[str]:
    """The constant vector `add` adds to `y`, if it is one of the MatMul's output width."""
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == y else add.input[0]
    t = inits.get(other)
    return other if t is not None and list(t.dims) == [width] else None


def fuse_int8_matmuls(model) -> int:
    """Rewrite in place (see the module docstring); returns the number of MatMuls fused."""
    from onnx import helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers = _readers(g)
    fused, drop = 0, set()
    new_nodes = {}  # id(MatMul) -> the node that replaces it
    for mm in g.node:
        if mm.op_type != "MatMul":
            continue
        dq_x, dq_w = producer.get(mm.input[0]), producer.get(mm.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        w_q = inits.get(dq_w.input[0])
        if w_q is None or len(w_q.dims) != 2 or len(dq_x.input) < 3 or len(dq_w.input) < 3:
            continue
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        w_scale = inits.get(dq_w.input[1])
        if w_scale is None or (len(w_scale.dims) == 1 and axis not in (1, -1)):
            continue  # per-row weight scales: not what MatMulIntegerToFloat takes
        x_scale = inits.get(dq_x.input[1])
        if x_scale is None or int(np.prod(x_scale.dims)) != 1:
            continue  # per-tensor activations only
        y = mm.output[0]
        after = readers.get(y, [])
        bias = _bias(after[0], y, inits, int(w_q.dims[1])) if len(after) == 1 else None
        out = after[0].output[0] if bias else y
        inputs = [dq_x.input[0], dq_w.input[0], dq_x.input[1], dq_w.input[1], dq_x.input[2], dq_w.input[2]]
        if bias:
            inputs.append(bias)
            drop.add(id(after[0]))
        new_nodes[id(mm)] = helper.make_node("MatMulIntegerToFloat", inputs, [out], name=mm.name, domain=MS_DOMAIN)
        fused += 1
    if not fused:
        return 0
    nodes = [new_nodes.get(id(n), n) for n in g.node if id(n) not in drop]
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused
