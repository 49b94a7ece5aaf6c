"""Graph optimisations on exported ONNX files (ECOSYSTEM.md 3.2).

* `fuse_transformer`: onnxruntime.transformers' optimizer (model type "clip": BERT fusions plus
  CLIP attention/QuickGelu) with ORT's own graph optimiser off (opt_level 0), so the file stays
  portable across execution providers; returns the fused-operator counts for the manifest. Fused
  ops are ORT contrib ops (com.microsoft): such graphs are for ONNX Runtime, never TensorRT.
* `ort_offline`: ORT's full optimiser (ORT_ENABLE_ALL) run once and saved; the result is tied to
  the execution provider and the CPU it was made on (benchmarks, not bundles).
* `to_fp16`: float16 weights and compute with float32 (and uint8/int64) inputs and outputs.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Optional

from clipheads.training.backbone import Backbone

log = logging.getLogger(__name__)


def tower_geometry(backbone: Backbone, tower: str) -> tuple[int, int]:
    """(num_heads, hidden_size) of a tower's first block (what the fusions need)."""
    blocks = backbone.model.visual.transformer.resblocks if tower == "vision" else backbone.text_blocks
    attn = blocks[0].attn
    heads = int(getattr(attn, "num_heads", 0) or getattr(attn, "n_head", 0))
    width = int(getattr(attn, "embed_dim", 0) or blocks[0].ln_1.normalized_shape[0])
    return heads, width


def fuse_transformer(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int, use_gpu: bool = False,
                     model_type: str = "clip") -> dict:
    """Write the fused graph to dst; return {"fused": {op: count>0}, "attention_fused": n, ...}."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(model_type)
    quiet = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_base", "onnx_model", "")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:  # the optimizer print()s shape-inference chatter; stdout belongs to --json
        with contextlib.redirect_stdout(io.StringIO()):
            m = optimizer.optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                         optimization_options=opts, opt_level=0, use_gpu=use_gpu)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    stats = {k: int(v) for k, v in m.get_fused_operator_statistics().items() if v}
    m.save_model_to_file(str(dst))
    attention = sum(v for k, v in stats.items() if "Attention" in k)
    return {"model_type": model_type, "fused": stats, "attention_fused": attention, "num_heads": num_heads,
            "hidden_size": hidden_size}


def ort_offline(src: str | Path, dst: str | Path, level: str = "all", threads: Optional[int] = None) -> Path:
    """Run ORT's graph optimiser (basic | extended | all) once and save the optimised graph."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return Path(dst)


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights/compute, fp32 IO (keep_io_types). For GPU runtimes; CPU runs it slowly."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(onnx.load(str(src)))
    with contextlib.redirect_stdout(io.StringIO()):
        m.convert_float_to_float16(keep_io_types=True)
    m.save_model_to_file(str(dst))
    return Path(dst)


def op_counts(path: str | Path) -> dict:
    """{op_type: count} of a graph (domain-qualified for contrib ops)."""
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        k = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))
