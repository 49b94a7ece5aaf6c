"""Error-compensating int8 weight rounding (GPTQ, Frantar et al. 2023) for the static recipe (issue 17.3).

Round-to-nearest rounds every weight on its own. GPTQ rounds one input row of W (K, N) at a time
and spreads each row's rounding error over the rows not yet rounded, weighted by the inverse of
H = X^T X of the layer's calibration inputs, so that X @ W_q stays close to X @ W rather than
W_q close to W. Scales are not touched: each output channel keeps the scale ORT's quantizer gave
it (max |w| / 127), only the integers change, so the graph's format and speed are the same.

On the tiny CLIP's heads, weights-only int8 (activations fp32) over all 3,072 world images:
logit RMS error 0.025 -> 0.017 (MaPLe) and 0.023 -> 0.016 (CoOp) against round-to-nearest
(bench/export/int8_world.md).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def gptq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, block: int = 128, damp: float = 0.01) -> np.ndarray:
    """int8 of w (K, N) given H = X^T X (K, K) of its inputs and per-column scales (N,)."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64).reshape(1, -1)
    k = w.shape[0]
    dead = np.diag(h) <= 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))  # the paper's dampening, 1% of the mean diagonal
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    q = np.empty_like(w)
    for i0 in range(0, k, block):  # lazy batches: the rows below the block get one GEMM update
        i1 = min(i0 + block, k)
        wb, ub = w[i0:i1].copy(), u[i0:i1, i0:i1]
        err = np.empty_like(wb)
        for j in range(i1 - i0):
            q[i0 + j] = np.clip(np.round(wb[j] / scale[0]), -127, 127)
            err[j] = (wb[j] - q[i0 + j] * scale[0]) / ub[j, j]
            wb[j + 1:] -= np.outer(ub[j, j + 1:], err[j])
        w[i1:] -= u[i0:i1, i1:].T @ err
    return q.astype(np.int8)


def gram(rows: Iterable[np.ndarray]) -> np.ndarray:
    """X^T X over batches of rows (R, K): each batch's product in float32 (BLAS speed: the
    3072-wide inputs of a ViT-B are most of the quantizer's added time), summed in float64."""
    out = None
    for x in rows:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        g = (x.T @ x).astype(np.float64)
        out = g if out is None else out + g
    return out


def round_weights(model, fp32_weights: dict[str, np.ndarray], hessians: dict[str, np.ndarray],
                  cache: dict[str, np.ndarray]) -> int:
    """Rewrite, in a static QDQ graph, the int8 weights of the MatMuls named in `fp32_weights`
    ({node: W (K, N)}, H in `hessians`) with GPTQ rounding at their existing scales; `cache` keeps
    each node's result for the next graph of the search. Returns the number of MatMuls rewritten."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    done = 0
    for mm in model.graph.node:
        if mm.op_type != "MatMul" or mm.name not in fp32_weights:
            continue
        dq = producer.get(mm.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue  # kept fp32 in this graph
        w_q, w_scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
        if w_q.data_type != 3 or (zero is not None and np.any(zero)) or w_scale.ndim != 1:
            continue  # not symmetric int8 per output channel
        if mm.name not in cache:
            cache[mm.name] = gptq_round(fp32_weights[mm.name], hessians[mm.name], w_scale)
        w_q.CopyFrom(numpy_helper.from_array(cache[mm.name], w_q.name))
        done += 1
    return done
