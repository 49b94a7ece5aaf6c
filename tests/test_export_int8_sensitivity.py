"""Issue 17.3: the int8 search ranks its candidates by the logit error each causes alone
(export/int8_sensitivity.py), measured in one switched graph that must compute exactly what the
real int8 graph with that one candidate quantized computes."""
from __future__ import annotations

import numpy as np
import pytest

from clipheads.export.gate_images import world_images

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def graph(micro_backbone, tmp_path_factory, micro_zeroshot_graph):
    import onnx

    from clipheads.export.int8_candidates import candidates, measure_local_errors
    from clipheads.export.quantize import _preprocessed, image_feeds

    tmp = tmp_path_factory.mktemp("sens")
    pre = _preprocessed(micro_zeroshot_graph, tmp)
    model = onnx.load(str(pre))
    feeds = image_feeds(world_images(micro_backbone.preprocess, 16, seed=1).pixels, [0], batch=8)
    cands = [c for c in candidates(model) if c.kind == "Conv" or c.node.endswith("mlp/c_fc/MatMul")
             or c.node.endswith("attn/out_proj/MatMul")]
    measure_local_errors(pre, model, cands, feeds, tmp)
    fp32 = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"])
    ref = np.concatenate([fp32.run(["logits"], f)[0] for f in feeds])
    return pre, model, cands, feeds, ref, tmp


def _alone_int8(pre, model, cands, feeds, keep_int8, activations, tmp):
    """The real static graph (ORT's quantizer, weights rounded to nearest) with only `keep_int8` int8."""
    from clipheads.export.int8_candidates import not_candidates
    from clipheads.export.quantize import FeedReader, Int8Recipe, _shipped, _static

    others = [n for n in not_candidates(model, [keep_int8]) if n != keep_int8.node]
    recipe = Int8Recipe(weight_rounding="nearest")
    op_types = ("MatMul", "Gemm", "Conv") if keep_int8.kind == "Conv" else ("MatMul", "Gemm")
    static = _static(pre, tmp / f"alone_{len(others)}_{keep_int8.kind}.onnx", FeedReader(feeds), others, recipe,
                     tmp / f"cal_{keep_int8.kind}.json", op_types)
    path = static if activations == "per-tensor" else _shipped(static, static.with_suffix(".pr.onnx"), activations)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], f)[0] for f in feeds])


@pytest.mark.parametrize("activations", ["per-tensor", "per-row"])
def test_the_switched_graph_is_fp32_when_off_and_each_real_int8_graph_when_on(graph, activations):
    import onnx

    from clipheads.export.int8_sensitivity import SWITCH, int8_weights, switched_graph

    pre, model, cands, feeds, ref, tmp = graph
    sw = switched_graph(model, cands, activations, {c.activation: c.activation_range for c in cands},
                        int8_weights(model, cands, None))
    path = tmp / f"switched_{activations}.onnx"
    onnx.save(sw, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda s: np.concatenate([sess.run(["logits"], {**f, SWITCH: s})[0] for f in feeds])  # noqa: E731
    np.testing.assert_allclose(run(np.zeros(len(cands), np.float32)), ref, atol=1e-5)
    for i in (0, 1, len(cands) - 1):  # the patch Conv (per tensor either way) and two MatMuls
        one = np.eye(len(cands), dtype=np.float32)[i]
        real = _alone_int8(pre, model, cands, feeds, cands[i], activations, tmp)
        moved = np.abs(real - ref).max()
        assert moved > 1e-4  # the candidate alone int8 does move the logits...
        np.testing.assert_allclose(run(one), real, atol=0.002 * moved + 1e-6)  # ...and the switch moves them the same


def test_the_search_ranks_by_logit_error_only_when_keeping_none_fails(micro_backbone, micro_zeroshot_graph, tmp_path):
    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated

    src = micro_zeroshot_graph
    feeds = image_feeds(world_images(micro_backbone.preprocess, 16, seed=1).pixels, [0], batch=8)
    passes = lambda ref, got: (True, 1.0)  # noqa: E731
    rep = quantize_calibrated(src, tmp_path / "a.onnx", feeds, Int8Recipe(), passes)
    assert rep["ranking"].startswith("none needed") and not any("logit_error" in c for c in rep["most_sensitive"])

    def never(ref, got):
        return False, -float(np.abs(got - ref).mean())
    rep = quantize_calibrated(src, tmp_path / "b.onnx", feeds, Int8Recipe(activations="per-tensor", sensitivity_images=8), never)
    errs = [c["logit_error"] for c in rep["most_sensitive"]]
    assert rep["ranking"] == "logit error alone int8" and errs == sorted(errs, reverse=True) and errs[0] > 0
    sensitive = [c for c in rep["kept_fp32"] if c["reason"] == "sensitive"]
    assert sensitive and all("logit_error" in c for c in sensitive)
    assert [t["kept_sensitive"] for t in rep["search"]][0] == 0  # keeping none was tried before any ranking
    local = quantize_calibrated(src, tmp_path / "c.onnx", feeds, Int8Recipe(activations="per-tensor", ranking="local"), never)
    assert local["ranking"] == "local error" and not any("logit_error" in c for c in local["most_sensitive"])
    with pytest.raises(ValueError, match="ranking"):
        Int8Recipe(ranking="random").validate()
