"""SmoothQuant scale migration (export/smooth.py, issue 17.3): in fp32 the migrated graph computes
the same logits, the scales really moved (LayerNorm gamma/beta folded, a Mul where no LayerNorm
can take them), and the quantizer runs on the migrated graph when a recipe asks for it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipheads.export.gate_images import world_images
from clipheads.training.methods import TaskSpec, build_method

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TASKS = (TaskSpec("shapes", ("circle", "square", "triangle", "star")),)


@pytest.fixture(scope="module")
def graph(micro_backbone, tmp_path_factory):
    from clipheads.export.attention import fused_attention
    from clipheads.export.fold import fold_heads
    from clipheads.export.onnx_export import export_image_graph

    torch.manual_seed(0)
    head = build_method("coop", micro_backbone, TASKS).eval()
    with fused_attention(micro_backbone):  # the graph `--precision int8` quantizes
        path = export_image_graph(fold_heads([head]).graphs[0].encoder, tmp_path_factory.mktemp("smooth") / "fp32.onnx")
    px = world_images(micro_backbone.preprocess, 24, seed=2).pixels
    return path, px


def _logits(model_or_path, px):
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"pixels": px, "task_index": np.zeros(len(px), np.int64)})[0]


@pytest.mark.parametrize("fold", [True, False])
def test_migration_keeps_the_fp32_logits_and_moves_the_scales(graph, tmp_path, fold):
    from onnx import numpy_helper

    from clipheads.export.int8_candidates import candidates, measure_local_errors
    from clipheads.export.quantize import image_feeds, smoothed
    from clipheads.export.smooth import SmoothConfig

    path, px = graph
    model = onnx.load(str(path))
    cands = candidates(model)
    feeds = image_feeds(px[:16], [0], 8)
    measure_local_errors(path, model, cands, feeds, tmp_path)
    pooled = {c.node for c in cands if c.rows_per_image <= 1.0 + 1e-9}
    out_path, out, report = smoothed(model, cands, feeds, SmoothConfig(alpha=0.5, fold_layernorm=fold), tmp_path, pooled)
    # every MatMul but the pooled ones; the patch Conv is never migrated (its input is the image)
    assert {n for r in report for n in r["nodes"]} == {c.node for c in cands if c.kind != "Conv"} - pooled
    where = [r["inverse_scale_in"] for r in report]
    if fold:  # qkv in_proj and c_fc take 1/s in their LayerNorm; out_proj and c_proj need a Mul
        assert sum(w.startswith("LayerNorm") for w in where) == 2 * 3 and where.count("Mul before the MatMul") == 2 * 3
    else:
        assert all(w == "Mul before the MatMul" for w in where)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    changed = [i.name for i in out.graph.initializer if i.name in before
               and not np.array_equal(before[i.name], numpy_helper.to_array(i))]
    assert len(changed) >= len(report)  # every smoothed weight (and folded gamma/beta) moved
    assert all(r["channel_spread_after"] <= r["channel_spread_before"] + 1e-6 for r in report)
    ref, got = _logits(path, px), _logits(out_path, px)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # the equality is not vacuous: dropping the activation side of the migration changes the logits
    broken = onnx.ModelProto()
    broken.CopyFrom(out)
    for n in broken.graph.node:
        if n.op_type == "Mul" and n.name.endswith("_smooth"):
            n.op_type, n.input[1] = "Identity", n.input[0]
            del n.input[1]
    assert np.abs(_logits(broken, px) - ref).max() > 1e-3


def test_static_int8_on_the_migrated_graph_reports_it(graph, tmp_path):
    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated

    path, px = graph
    rep = quantize_calibrated(path, tmp_path / "q.onnx", image_feeds(px[:16], [0], 8),
                              Int8Recipe(keep=0, smooth_alpha=0.5), workdir=tmp_path)
    assert rep["smooth"]["alpha"] == 0.5 and rep["smooth"]["activations"]
    got, ref = _logits(tmp_path / "q.onnx", px), _logits(path, px)
    assert np.abs(got - ref).max() > 0  # quantized
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9  # not broken
    with pytest.raises(ValueError):
        Int8Recipe(smooth_alpha=1.5).validate()
