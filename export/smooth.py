"""SmoothQuant-style scale migration before int8 (issue 17.3; Xiao et al. 2023).

A MatMul X @ W equals (X / s) @ (diag(s) W) for any positive per-input-channel s. Per-tensor uint8
activations lose the most where a few channels of X are much larger than the rest; moving part of
that range into the weights (which int8 quantizes per *output* channel, so a row scale costs them
little) evens the channels out:

    s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)     (k: input channel, maxima over calibration)

Where 1/s goes, by who produced X (through float Casts):
  * a LayerNormalization whose output reaches only the smoothed MatMuls: its gamma and beta are
    divided by s (exact, free: qkv in_proj and mlp c_fc of a CLIP block);
  * anything else (GELU before mlp c_proj, attention before out_proj): one elementwise Mul by 1/s
    on the MatMul's input, (T, K) multiplies against the MatMul's 2 T K N FLOPs.

In fp32 the transformed graph computes the same function (tests: <= 1e-5 on the logits); only the
rounding that int8 adds afterwards changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

FOLD_THROUGH = ("Cast",)  # value-preserving ops between a LayerNorm and its MatMuls in open_clip graphs


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float = 0.5  # 0: nothing moves; 1: all of X's range moves into W
    min_scale: float = 1e-2  # clip s to [min_scale, 1/min_scale] relative to its geometric mean
    fold_layernorm: bool = True  # False: always an explicit Mul (for tests and comparisons)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth alpha must be in [0, 1], got {self.alpha}")


def _init_map(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _producer(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _transposed(node) -> bool:
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _layernorm_source(tensor: str, prod: dict, cons: dict, group: set[str], inits: dict):
    """The LayerNormalization whose (Cast-only) output chain ends in exactly the `group` MatMuls, or None."""
    chain, t = [], tensor
    while t in prod and prod[t].op_type in FOLD_THROUGH:
        chain.append(prod[t])
        t = prod[t].input[0]
    ln = prod.get(t)
    if ln is None or ln.op_type != "LayerNormalization" or len(ln.input) < 3:
        return None
    if _constant(ln.input[1], prod, inits) is None or _constant(ln.input[2], prod, inits) is None:
        return None
    # every path out of the LayerNorm must be the chain to `tensor`, which feeds only the group
    frontier, ends = [ln.output[0]], []
    while frontier:
        x = frontier.pop()
        for c in cons.get(x, []):
            if c.op_type in FOLD_THROUGH:
                frontier.append(c.output[0])
            else:
                ends.append(c)
    if {c.name for c in ends} != group or any(c.input[0] != tensor for c in ends):
        return None
    if len(ln.output) > 1 and any(cons.get(o) for o in ln.output[1:]):
        return None
    return ln


def _constant(name: str, prod: dict, inits: dict):
    """The initializer behind `name`, through Identity nodes (exporters dedupe equal weights that way)."""
    while name not in inits and name in prod and prod[name].op_type == "Identity":
        name = prod[name].input[0]
    return inits.get(name)


def smooth_scales(act_amax: np.ndarray, weights: Sequence[np.ndarray], cfg: SmoothConfig) -> np.ndarray:
    """Per-input-channel s for one activation and the (K, N) weights of every MatMul that reads it."""
    w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    a = np.maximum(act_amax.astype(np.float64), 1e-8)
    w = np.maximum(w_amax.astype(np.float64), 1e-8)
    s = a ** cfg.alpha / w ** (1.0 - cfg.alpha)
    g = np.exp(np.mean(np.log(s)))  # keep the overall magnitude where it was
    s = np.clip(s / g, cfg.min_scale, 1.0 / cfg.min_scale)
    return s.astype(np.float32)


def smooth_model(model, groups: Mapping[str, Sequence[str]], act_amax: Mapping[str, np.ndarray],
                 cfg: SmoothConfig = SmoothConfig()) -> list[dict]:
    """Apply scale migration in place. `groups`: activation tensor -> names of the MatMul/Gemm nodes
    (constant initializer weights) that read it; `act_amax`: per-channel max |x| of each activation.
    Returns one record per smoothed activation (where 1/s went, the channel spread before/after)."""
    from onnx import numpy_helper

    cfg.validate()
    inits = _init_map(model)
    cons, prod = _consumers(model), _producer(model)
    by_name = {n.name: n for n in model.graph.node}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    report = []
    for act, names in groups.items():
        nodes = [by_name[n] for n in names]
        if act not in act_amax or any(n.input[1] not in inits or uses.get(n.input[1], 0) != 1 for n in nodes):
            continue  # shared or non-initializer weights: leave as is
        ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        ws_kn = [w.T if _transposed(n) else w for w, n in zip(ws, nodes)]
        amax = np.asarray(act_amax[act], np.float32)
        if any(w.shape[0] != amax.shape[0] for w in ws_kn):
            continue
        s = smooth_scales(amax, ws_kn, cfg)
        for n, w in zip(nodes, ws):
            scaled = w * (s[None, :] if _transposed(n) else s[:, None])
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), n.input[1]))
        ln = _layernorm_source(act, prod, cons, set(names), inits) if cfg.fold_layernorm else None
        if ln is not None:  # gamma, beta / s as this LayerNorm's own new initializers (the old may be shared)
            for k in (1, 2):
                v = numpy_helper.to_array(_constant(ln.input[k], prod, inits)).astype(np.float32) / s
                name = f"{ln.name}_smooth_{k}"
                model.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), name))
                ln.input[k] = name
            where = f"LayerNorm {ln.name}"
        else:
            _insert_mul(model, act, nodes, 1.0 / s)
            where = "Mul before the MatMul"
        spread = lambda x: float(x.max() / max(np.median(x), 1e-12))  # noqa: E731
        report.append({"activation": act, "nodes": list(names), "inverse_scale_in": where,
                       "channel_spread_before": round(spread(amax), 3),
                       "channel_spread_after": round(spread(amax / s), 3)})
    return report


def _insert_mul(model, act: str, nodes: Sequence, inv_s: np.ndarray) -> None:
    from onnx import helper, numpy_helper

    scale_name, out = f"{act}_smooth_inv_scale", f"{act}_smooth"
    model.graph.initializer.append(numpy_helper.from_array(inv_s.astype(np.float32), scale_name))
    mul = helper.make_node("Mul", [act, scale_name], [out], name=f"{nodes[0].name}_smooth")
    for n in nodes:
        n.input[0] = out
    # keep the graph topologically sorted: the Mul goes right before its first consumer
    first = min(i for i, n in enumerate(model.graph.node) if n.name in {x.name for x in nodes})
    model.graph.node.insert(first, mul)
