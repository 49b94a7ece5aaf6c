"""What the int8 search works on: the quantizable nodes of an fp32 graph and what each loses.

`candidates` finds the MatMul/Gemm nodes with a constant weight (and a ViT's patch Conv);
`measure_local_errors` runs the fp32 graph once over the calibration feeds, returning every
candidate's input, and fills in its size (rows and FLOPs per image), its activation range, the
relative output error it would have alone int8 (per-tensor and per-row activation ranges) and, for
GPTQ, its inputs' X^T X. The fake-quantizers emulate ORT's roundings (uint8 asymmetric activations,
int8 symmetric weights per output channel) for those errors and for `int8_sensitivity.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


@dataclass
class Candidate:
    node: str
    kind: str  # "MatMul" | "Gemm" | "Conv" (patch embedding)
    activation: str  # the input tensor that gets quantized
    weight: str  # the constant input (initializer)
    rows_per_image: float = 0.0
    flops_per_image: float = 0.0
    local_error: float = 0.0
    local_error_per_row: float = 0.0  # the same with each row's own activation range (int8_per_row.py; Convs: per tensor)
    input_gram: Optional[np.ndarray] = None  # X^T X of the calibration inputs (GPTQ, int8_gptq.py)
    activation_range: tuple[float, float] = (0.0, 0.0)  # min/max of the input over the calibration images
    output: str = ""  # the output tensor (a patch Conv's is quantized too: QLinearConv writes uint8)
    output_range: tuple[float, float] = (0.0, 0.0)  # its min/max, for Convs
    # RMS logit error with this candidate alone int8, per activation-range mode (int8_sensitivity.py)
    logit_error: dict = field(default_factory=dict)

    def local(self, activations: str) -> float:
        return self.local_error_per_row if activations == "per-row" else self.local_error

    def error(self, activations: str) -> float:
        """What the search ranks by: the logit error when measured, else the local one."""
        return self.logit_error.get(activations, self.local(activations))

    def errors(self, activations: str) -> dict:
        """Its errors for the report (the logit one only where measured)."""
        out = {"local_error": round(self.local(activations), 6)}
        if activations in self.logit_error:
            out["logit_error"] = round(self.logit_error[activations], 6)
        return out


def ort_session(path, threads: int = 0):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    if threads:
        o.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _is_patch_conv(node) -> bool:
    """A Conv that cuts the image into non-overlapping patches: stride == kernel > 1, no padding,
    dilation or groups (a ViT's patch embedding; as int8 it is one QLinearConv). A 1x1 stride-1 Conv
    (a ResNet bottleneck's) has stride == kernel too, but is no patch embedding: it stays fp32."""
    a = {x.name: x for x in node.attribute}
    ints = lambda k, d: list(a[k].ints) if k in a else d  # noqa: E731
    kernel = ints("kernel_shape", None)
    return (node.op_type == "Conv" and kernel is not None and any(k > 1 for k in kernel)
            and ints("strides", [1] * len(kernel)) == kernel
            and not any(ints("pads", [])) and set(ints("dilations", [1])) == {1}
            and (a["group"].i if "group" in a else 1) == 1)


def candidates(model, patch_embedding: bool = True) -> list[Candidate]:
    """MatMul/Gemm nodes whose second input is a constant (what int8 quantizes), and with
    `patch_embedding` the patch Convs."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for n in model.graph.node:
        const_b = len(n.input) >= 2 and (n.input[1] in inits or n.input[1] in consts)
        if const_b and (n.op_type in ("MatMul", "Gemm") or (patch_embedding and _is_patch_conv(n))):
            out.append(Candidate(n.name, n.op_type, n.input[0], n.input[1], output=n.output[0]))
    return out


def not_candidates(model, cands: Sequence[Candidate]) -> list[str]:
    """The nodes ORT's quantizer would take but that are never int8 here: Convs other than the patch
    embedding, and MatMuls of two activations (an unfused attention core: q k^T, softmax v; ORT's
    QDQ quantizer ignores MatMulConstBOnly)."""
    names = {c.node for c in cands}
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.name not in names]


def as_gemm(c: Candidate, x: np.ndarray, w: np.ndarray, trans_b: bool) -> tuple[np.ndarray, np.ndarray]:
    """The candidate as rows x (R, K) times weights (K, N) with output channels as columns."""
    if c.kind == "Conv":  # (N, C, H, W) * (D, C, p, p), stride p -> patches (N*L, C*p*p) @ (C*p*p, D)
        d, ch, ph, pw = w.shape
        n, _, h, wd = x.shape
        x = x[:, :, :h - h % ph, :wd - wd % pw].reshape(n, ch, h // ph, ph, wd // pw, pw)
        return x.transpose(0, 2, 4, 1, 3, 5).reshape(-1, ch * ph * pw), w.reshape(d, -1).T
    return x.reshape(-1, x.shape[-1]), (w.T if trans_b else w)


def constant_weights(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i).astype(np.float32)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t).astype(np.float32)
    raise KeyError(name)


def fake_quant_activation(x: np.ndarray, lo, hi) -> np.ndarray:
    """uint8 asymmetric with 0 exactly representable; lo/hi scalars (per tensor) or (R, 1) (per row,
    what int8_per_row.py computes at run time)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum(hi - lo, 1e-12) / 255.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def fake_quant_weight(w: np.ndarray, trans_b: bool) -> np.ndarray:
    axis = 1 if not trans_b else 0  # output channels: columns of B (rows when Gemm transposes it)
    amax = np.abs(w).max(axis=1 - axis, keepdims=True).clip(1e-12)
    scale = amax / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def _probe_session(model, names: Sequence[str], work: Path):
    """An ORT session of `model` that also outputs the tensors `names` (deduplicated, in order)."""
    import onnx

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    have = {o.name for o in aug.graph.output}
    for n in names:
        if n not in have:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    path = work / "activation_probe.onnx"
    onnx.save(aug, str(path))
    return ort_session(path), list(dict.fromkeys(names))


def probe(model, names: Sequence[str], feeds: Sequence[dict], work: Path, keep_batches: int = 2,
           gram_of: Sequence[str] = ()):
    """One fp32 run over `feeds` that also returns the tensors `names`: per-tensor min/max and
    per-channel (last axis) max |x| over all feeds, the rows of the first `keep_batches`, and
    X^T X over all feeds of the tensors in `gram_of` (rows: the last axis)."""
    from .int8_gptq import gram

    sess, names = _probe_session(model, names, work)
    grams: dict[str, np.ndarray] = {}
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    amax: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, feed in enumerate(feeds):
        for n, x in zip(names, sess.run(names, feed)):
            lo[n], hi[n] = min(lo[n], float(x.min())), max(hi[n], float(x.max()))
            flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
            a = np.abs(flat).max(axis=0)
            amax[n] = a if n not in amax else np.maximum(amax[n], a)
            if i < keep_batches:
                kept[n].append(x.astype(np.float32))
            if n in gram_of:
                g = gram([x])
                grams[n] = g if n not in grams else grams[n] + g
    return lo, hi, amax, kept, grams


def measure_local_errors(model_path: Path, model, cands: list[Candidate], feeds: Sequence[dict], work: Path,
                         grams: bool = False) -> None:
    """Fill `rows_per_image`, `flops_per_image` and `local_error(_per_row)` of every candidate from one
    fp32 run that also returns each candidate's input (ranges from all feeds, errors on the first
    ones); with `grams`, each MatMul's `input_gram` (X^T X over all feeds, for GPTQ) in the same run."""
    gram_of = {c.activation for c in cands if c.kind == "MatMul"} if grams else set()
    conv_outputs = [c.output for c in cands if c.kind == "Conv"]
    lo, hi, _, kept, gram = probe(model, [c.activation for c in cands] + conv_outputs, feeds, work, gram_of=gram_of)
    first = sum(len(f["pixels"]) for f in feeds[:2])
    trans = {n.name: any(a.name == "transB" and a.i for a in n.attribute) for n in model.graph.node}
    for c in cands:
        x, wm = as_gemm(c, np.concatenate(kept[c.activation]), constant_weights(model, c.weight), trans.get(c.node, False))
        wq = fake_quant_weight(wm, False)
        y = x @ wm
        rel = lambda xq: float(np.linalg.norm(xq @ wq - y) / max(np.linalg.norm(y), 1e-12))  # noqa: E731
        c.local_error = rel(fake_quant_activation(x, lo[c.activation], hi[c.activation]))
        c.local_error_per_row = c.local_error if c.kind == "Conv" else rel(
            fake_quant_activation(x, x.min(1, keepdims=True), x.max(1, keepdims=True)))
        c.rows_per_image = len(x) / first
        c.flops_per_image = 2.0 * c.rows_per_image * wm.shape[0] * wm.shape[1]
        c.input_gram = gram.get(c.activation)  # shared by the readers of one input (q, k, v)
        c.activation_range = (lo[c.activation], hi[c.activation])
        if c.kind == "Conv":
            c.output_range = (lo[c.output], hi[c.output])
