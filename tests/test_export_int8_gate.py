"""Issue 17.3: the gate judges real images (the head's data, else the world) with a confidence
interval, random-init backbones get a gate that near-ties cannot move, and static int8 is
calibrated on real images with its fp32-kept MatMuls named in the manifest. Small sets here (the
world-wide agreement is bench/export/bench_int8_world.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipheads.export import parity
from clipheads.export.gate_images import gate_and_calibration, split_selection, wilson_interval, world_images
from clipheads.training.methods import TaskSpec, build_method

ort = pytest.importorskip("onnxruntime")

TASKS = (TaskSpec("shapes", ("circle", "square", "triangle", "star")),)


def test_wilson_interval_and_expected_agreement():
    lo, hi = wilson_interval(256, 256)
    assert hi == 1.0 and 0.98 < lo < 0.99  # 256 of 256 cannot show 99.5% either way
    lo, hi = wilson_interval(990, 1000)
    assert lo < 0.99 < hi
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 10)) * 3
    assert parity.expected_agreement(ref, ref) == 1.0
    noisy = ref + rng.normal(size=ref.shape) * 0.3
    measured = (noisy.argmax(1) == ref.argmax(1)).mean()
    assert abs(parity.expected_agreement(ref, noisy) - measured) < 0.05
    assert parity.expected_agreement(ref, ref + rng.normal(size=ref.shape) * 0.03) > parity.expected_agreement(ref, noisy)


def test_the_random_init_gate_ignores_near_ties_but_not_real_errors():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(200, 5))
    ref[:100, 1] = ref[:100, 0] = ref[:100].max(1) + 1.0  # 100 exact ties between classes 0 and 1
    ref[:100, 0] += 1e-4
    flipped = ref.copy()
    flipped[:100, 1] += 2e-4  # every near-tie flips
    a = parity.agreement(ref, flipped)
    assert a["top1_agreement"] == 0.5 and a["top1_agreement_decided_half"] == 1.0
    wrong = ref.copy()
    wrong[100:, 4] += 10.0  # real errors on decided rows
    assert parity.agreement(ref, wrong)["top1_agreement_decided_half"] < 0.99


def test_the_real_gate_judges_coin_flip_answers_by_their_expected_agreement():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(256, 5)) * 3
    ref[:3, 1] = ref[:3, 0] = ref[:3].max(1) + 1.0  # 3 near-ties between classes 0 and 1
    ref[:3, 0] += 1e-4
    got = ref + rng.normal(size=ref.shape) * 1e-3  # the graph's typical error
    got[:3, 1] += 5e-3  # only the near-ties flip: 98.8% raw
    a = parity.agreement(ref, got)
    assert a["top1_agreement"] < 0.99 and parity.flips_within_typical_error(ref, got) == (3, 3)
    assert parity.real_gate_failure(parity.task_agreement(ref, got), 0.99) is None
    wrong = got.copy()
    wrong[100, (ref[100].argmax() + 1) % 5] += 20.0  # one gross error beside them: its own row cannot excuse it
    assert "1 of 4 flips beyond" in parity.real_gate_failure(parity.task_agreement(ref, wrong), 0.99)
    noisy = ref + rng.normal(size=ref.shape) * 2.0  # errors as large as the margins: many flips
    assert parity.agreement(ref, noisy)["expected_agreement"] < 0.99
    assert parity.real_gate_failure(parity.task_agreement(ref, noisy), 0.99) is not None
    assert parity.real_gate_failure(parity.task_agreement(ref, ref.copy()), 0.99) is None


def test_gate_images_come_from_the_world_and_calibration_never_overlaps(micro_backbone):
    spec = micro_backbone.preprocess
    gate, calib = gate_and_calibration([], spec, 12, 8, seed=0)
    assert gate.source == calib.source == "synthetic world"
    assert gate.pixels.shape == (12, 3, spec.image_size, spec.image_size) and gate.pixels.dtype == np.uint8
    assert calib.pixels.shape[0] == 8
    flat_g = {p.tobytes() for p in gate.pixels}
    assert not flat_g & {p.tobytes() for p in calib.pixels}
    assert len(flat_g) == 12  # distinct images, every domain in turn
    np.testing.assert_array_equal(world_images(spec, 12, 0).pixels, gate.pixels)  # seeded


def test_gate_uses_the_heads_own_data_when_it_is_on_disk(micro_backbone, tmp_path):
    from clipheads.training.data.synth import WorldSize, generate_world

    root = generate_world(tmp_path / "w", seed=3, size=WorldSize(train=2, val=1, test=1), workers=1)
    head = build_method("zeroshot", micro_backbone, TASKS)
    head.training_record = {"data": {"shapes": f"synthetic:{root}:sketch"}}
    gate, calib = gate_and_calibration([head], micro_backbone.preprocess, 40, 16, seed=0)
    assert gate.source == calib.source == "head data" and gate.detail["available"] == 32 * 3
    assert len(gate.pixels) == 40 and len(calib.pixels) == 16
    assert not {p.tobytes() for p in gate.pixels} & {p.tobytes() for p in calib.pixels}
    head.training_record = {"data": {"shapes": f"synthetic:{tmp_path / 'moved'}:sketch"}}  # data gone: the world
    assert gate_and_calibration([head], micro_backbone.preprocess, 8, 0)[0].source == "synthetic world"


def test_gate_images_skip_the_heads_held_out_images_and_top_up_from_the_world(micro_backbone, tmp_path):
    """A head that held a test split out of an unsplit folder: export never draws those images;
    fewer head images than the sets ask for are topped up with world images, not shrunk."""
    from clipheads.training.data.holdout import carve
    from clipheads.training.data.synth import WorldSize, generate_world
    from clipheads.training.fit import resolve_data
    from clipheads.training.preprocess import prepare_pixels

    root = generate_world(tmp_path / "w", seed=4, size=WorldSize(train=3, val=0, test=1), workers=1)
    folder = str(root / "sketch")  # an ImageFolder of every image: 4 per class
    head = build_method("zeroshot", micro_backbone, TASKS)
    head.training_record = {"data": {"shapes": folder},
                            "holdout": {"shapes": {"val_fraction": 0.0, "test_fraction": 0.25, "seed": 1}}}
    gate, calib = gate_and_calibration([head], micro_backbone.preprocess, 100, 20, seed=0)
    assert (len(gate.pixels), len(calib.pixels)) == (100, 20)
    assert gate.source == "head data + synthetic world"
    assert (gate.detail["from_head_data"], gate.detail["from_world"]) == (96, 24)  # 3 of 4 per class, 32 classes
    held_out = carve(resolve_data({"shapes": folder})["shapes"], 0.0, 0.25, 1).test
    assert len(held_out) == 32
    test_px = {prepare_pixels(x.path, micro_backbone.preprocess).tobytes() for x in held_out}
    drawn = {p.tobytes() for p in (*gate.pixels, *calib.pixels)}
    assert not drawn & test_px and len(drawn) == 120


def test_static_int8_names_its_fp32_matmuls_and_the_gate_reports_an_interval(micro_backbone, tmp_path):
    from clipheads.export.bundle import load_bundle
    from clipheads.export.pipeline import ExportOptions, export_heads

    torch.manual_seed(0)
    head = build_method("coop", micro_backbone, TASKS).eval()
    res = export_heads([head], tmp_path / "b", ExportOptions(precision="int8", probes=32, calibration_images=16),
                       allow_parity_failure=True)
    m = load_bundle(tmp_path / "b").manifest
    rep = m["int8"]["image_0.onnx"]
    assert rep["mode"] == "static" and rep["calibration"]["source"] == "synthetic world"
    assert rep["calibration"]["n"] == 16 and rep["calibration"]["role"] == "calibration"
    kept = {k["node"]: k for k in rep["kept_fp32"]}
    # the pooled projection and the class matrix stay fp32; everything else was ranked and searched
    assert sum(k["reason"].startswith("pooled") for k in kept.values()) == 2
    assert rep["quantized_nodes"] == rep["candidate_nodes"] - len(kept) > 0
    assert rep["search"] and all(0.0 <= s["calibration_score"] <= 1.0 for s in rep["search"])
    assert m["int8"]["text.onnx"]["mode"] == "dynamic"
    p = res.parity
    assert p["mode"] == "random-init" and p["probe"]["source"] == "synthetic world" and p["probe"]["n"] == 32
    t = p["tasks"]["shapes"]
    lo, hi = t["top1_ci95"]
    assert lo <= t["top1_agreement"] <= hi and t["n"] == 32 and t["decided_half_n"] >= 16
    assert p["passed"] == (not p["failures"])
    from clipheads.export.optimize import op_counts

    ops = op_counts(tmp_path / "b" / "image_0.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0


def test_gate_mode_follows_the_backbone_record():
    assert parity.gate_mode_for({"pretrained": "none"}) == "random-init"
    assert parity.gate_mode_for({"pretrained": "clipheads"}) == "real"
    assert parity.gate_mode_for({"pretrained": "none"}, "real") == "real"
    with pytest.raises(ValueError):
        parity.gate_mode_for({}, "lenient")


def test_patch_conv_as_a_gemm_is_the_conv():
    """The patch embedding's sensitivity is measured as patches @ weights: that product must be the
    Conv's own output (a wrong patch order would rank it on a different function)."""
    from clipheads.export.int8_candidates import Candidate, as_gemm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 33, 32, generator=g)  # 33: a ragged edge the stride-p Conv drops
    w = torch.randn(5, 3, 8, 8, generator=g)
    want = torch.nn.functional.conv2d(x, w, stride=8)  # (2, 5, 4, 4)
    rows, wm = as_gemm(Candidate("c", "Conv", "x", "w"), x.numpy(), w.numpy(), False)
    got = (rows @ wm).reshape(2, 4, 4, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("patch_embedding", [True, False])
def test_static_int8_quantizes_the_patch_embedding_unless_told_not_to(micro_backbone, tmp_path, patch_embedding, micro_zeroshot_graph):
    import onnx

    from clipheads.export.int8_candidates import candidates
    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated

    src = micro_zeroshot_graph
    conv = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"]
    assert len(conv) == 1 and [c.kind for c in candidates(onnx.load(str(src)))].count("Conv") == 1
    pixels = world_images(micro_backbone.preprocess, 8, seed=1).pixels
    rep = quantize_calibrated(src, tmp_path / "int8.onnx", image_feeds(pixels, [0], batch=4),
                              Int8Recipe(keep=0, patch_embedding=patch_embedding))
    g = onnx.load(str(tmp_path / "int8.onnx")).graph
    ops = [n.op_type for n in g.node]
    inits = {i.name for i in g.initializer}
    int8_weight = {o for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits for o in n.output}
    node = next(n for n in g.node if n.op_type == "Conv")
    assert (node.input[1] in int8_weight) == patch_embedding
    assert rep["candidate_nodes"] == rep["quantized_nodes"] + len(rep["kept_fp32"])
    assert "MatMulIntegerToFloat" in ops and "MatMul" in ops  # shipped fused; the kept-fp32 ones stay MatMul
    assert rep["quantized_nodes"] == len([n for n in g.node if n.op_type in ("MatMul", "Gemm", "Conv")
                                          and n.input[1] in int8_weight]) + ops.count("MatMulIntegerToFloat")


def test_int8_matmuls_take_their_bias_and_compute_the_same(micro_backbone, tmp_path, micro_zeroshot_graph):
    """int8_fuse: every DQ -> MatMul (-> Add bias) of a static QDQ graph becomes one
    MatMulIntegerToFloat with the bias as input; ORT's answers do not change."""
    import onnx

    from clipheads.export.int8_fuse import fuse_int8_matmuls
    from clipheads.export.quantize import FeedReader, Int8Recipe, _static, image_feeds

    src = micro_zeroshot_graph
    pixels = world_images(micro_backbone.preprocess, 8, seed=1).pixels
    feeds = image_feeds(pixels, [0], batch=4)
    _static(src, tmp_path / "plain.onnx", FeedReader(feeds), [], Int8Recipe(), tmp_path / "c.json")
    plain = onnx.load(str(tmp_path / "plain.onnx"))
    fused = onnx.load(str(tmp_path / "plain.onnx"))
    assert fuse_int8_matmuls(fused) > 0
    fused_path = tmp_path / "q.onnx"
    onnx.save(fused, str(fused_path))
    inits = {i.name for i in plain.graph.initializer}
    int8_weight = {o for n in plain.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                   for o in n.output}
    n_int8 = sum(1 for n in plain.graph.node if n.op_type == "MatMul" and n.input[1] in int8_weight)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMulIntegerToFloat") == n_int8 > 0
    with_bias = [n for n in fused.graph.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7]
    assert with_bias and len(ops) < len(plain.graph.node) - n_int8  # each bias Add and weight DQ is gone
    assert fuse_int8_matmuls(fused) == 0  # nothing left to fuse
    px = pixels[:4]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["logits"], {"pixels": px, "task_index": np.zeros(len(px), np.int64)})[0]
    ref, got = run(tmp_path / "plain.onnx"), run(fused_path)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # not vacuous: dropping one fused (non-zero: attention biases start at 0) bias changes the answers
    from onnx import numpy_helper

    biases = {i.name: np.abs(numpy_helper.to_array(i)).max() for i in fused.graph.initializer}
    del max(with_bias, key=lambda n: biases[n.input[6]]).input[6]
    onnx.save(fused, str(tmp_path / "nobias.onnx"))
    assert np.abs(run(tmp_path / "nobias.onnx") - ref).max() > 1e-4


def _one_int8_matmul(x_dims, k, n, readers=1, seed=0):
    """QuantizeLinear(x) read by `readers` fused int8 MatMuls with bias, as int8_fuse writes them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outs, ref = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"])], [], [], []
    for r in range(readers):
        w = rng.standard_normal((k, n)).astype(np.float32)
        ws = (np.abs(w).max(0) / 127).astype(np.float32)
        wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
        b = rng.standard_normal(n).astype(np.float32)
        inits += [numpy_helper.from_array(a, f"{nm}{r}") for a, nm in
                  ((wq, "wq"), (ws, "ws"), (np.zeros(n, np.int8), "wz"), (b, "b"))]
        nodes.append(helper.make_node("MatMulIntegerToFloat", ["xq", f"wq{r}", "s", f"ws{r}", "z", f"wz{r}", f"b{r}"],
                                      [f"y{r}"], name=f"mm{r}", domain="com.microsoft"))
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT, None))
        ref.append((wq.astype(np.float32) * ws, b))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * len(x_dims))],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), ref


def test_per_row_activations_are_each_rows_own_int8_range():
    """int8_per_row: the rewritten graph computes dequant(x_q per row) @ dequant(w_q) + bias exactly,
    which is closer to fp32 than the per-tensor range when rows differ in scale; q/k/v-style readers
    of one input share one quantizer."""
    from onnx import numpy_helper

    from clipheads.export.int8_per_row import per_row_activations

    rng = np.random.default_rng(1)
    k, n = 16, 8
    x = (rng.standard_normal((3, 7, k)) * rng.uniform(0.05, 8.0, (3, 7, 1))).astype(np.float32)  # tokens of many scales
    model, ref = _one_int8_matmul(x.shape, k, n, readers=2)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(s), "s"),
                                    numpy_helper.from_array(np.uint8(round(-lo / s)), "z")])
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})
    per_tensor = run(model)
    assert per_row_activations(model) == 2
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("ReduceMax") == 1 and ops.count("MatMulIntegerToFloat") == 2  # one quantizer for both readers
    assert {i.name for i in model.graph.initializer}.isdisjoint({"s", "z"})  # the per-tensor range is gone
    per_row = run(model)
    x2 = x.reshape(-1, k)
    rlo, rhi = np.minimum(x2.min(1, keepdims=True), 0), np.maximum(x2.max(1, keepdims=True), 0)
    rs = np.maximum((rhi - rlo) / 255, 1e-12)
    rz = np.round(-rlo / rs)
    x_dq = ((np.clip(np.round(x2 / rs) + rz, 0, 255) - rz) * rs).reshape(x.shape)
    for got, pt, (w_dq, b) in zip(per_row, per_tensor, ref):
        assert got.shape == (3, 7, n)
        np.testing.assert_allclose(got, x_dq @ w_dq + b, rtol=1e-5, atol=1e-5)
        exact_x = x @ w_dq + b  # only the activations' rounding differs from this
        assert np.abs(got - exact_x).mean() < 0.5 * np.abs(pt - exact_x).mean()


def test_zero_point_rows_sum_to_minus_colsum_within_int8():
    from clipheads.export.int8_per_row import zero_point_rows

    rng = np.random.default_rng(0)
    for k in (16, 768, 3072):  # up to every weight at +-127: the largest colsum a K can have
        wq = rng.integers(-127, 128, (k, 5))
        wq[:, 0], wq[:, 1] = 127, -127
        colsum = wq.sum(0)
        m = int(np.ceil(np.abs(colsum).max() / 127))
        rows = zero_point_rows(colsum, m)
        assert rows.dtype == np.int8 and rows.shape == (m, 5)
        np.testing.assert_array_equal(rows.astype(np.int64).sum(0), -colsum)


def test_auto_activation_ranges_go_per_row_only_when_per_tensor_fails(micro_backbone, tmp_path, micro_zeroshot_graph):
    import onnx

    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated

    src = micro_zeroshot_graph
    feeds = image_feeds(world_images(micro_backbone.preprocess, 8, seed=1).pixels, [0], batch=4)
    passes = lambda ref, got: (True, 1.0)  # noqa: E731
    rep = quantize_calibrated(src, tmp_path / "a.onnx", feeds, Int8Recipe(keep=0), passes)
    assert [t["activations"] for t in rep["search"]] == ["per-tensor"] and rep["activation_ranges"] == "per-tensor"

    def closest_wins(ref, got):  # never passes: the best-scoring graph tried must ship
        return False, -float(np.abs(got - ref).mean())
    rep = quantize_calibrated(src, tmp_path / "b.onnx", feeds, Int8Recipe(keep=0), closest_wins)
    scores = {t["activations"]: t["calibration_score"] for t in rep["search"]}
    assert set(scores) == {"per-tensor", "per-row"} and scores["per-row"] > scores["per-tensor"]
    assert rep["activation_ranges"] == "per-row" and "per row" in rep["activations"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node]
    assert "ReduceMax" in ops and "MatMulIntegerToFloat" in ops
    with pytest.raises(ValueError, match="activations"):
        Int8Recipe(activations="per-channel").validate()


def test_gptq_rounding_keeps_x_times_w_closer_than_rounding_each_weight():
    """int8_gptq: on correlated inputs, GPTQ's integers (same scales, int8 range) give a smaller
    output error on those inputs than round-to-nearest; with H = I it is round-to-nearest."""
    from clipheads.export.int8_gptq import gptq_round, gram

    rng = np.random.default_rng(0)
    k, n = 64, 24
    x = rng.standard_normal((2000, k)) @ rng.standard_normal((k, k))  # correlated input channels
    w = rng.standard_normal((k, n)).astype(np.float32)
    scale = np.abs(w).max(0) / 127
    q = gptq_round(w, gram([x[:1000], x[1000:]]), scale)
    nearest = np.clip(np.round(w / scale), -127, 127)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127 and (q != nearest).any()
    err = lambda qq: np.linalg.norm(x @ (qq * scale) - x @ w)  # noqa: E731
    assert err(q) < 0.8 * err(nearest)
    np.testing.assert_array_equal(gptq_round(w, np.eye(k), scale, damp=0.0), nearest)


def test_static_int8_weights_are_gptq_rounded_at_the_quantizers_scales(micro_backbone, tmp_path, micro_zeroshot_graph):
    import onnx
    from onnx import numpy_helper

    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated

    src = micro_zeroshot_graph
    feeds = image_feeds(world_images(micro_backbone.preprocess, 16, seed=1).pixels, [0], batch=8)
    graphs, reports = {}, {}
    for rounding in ("gptq", "nearest"):
        dst = tmp_path / f"{rounding}.onnx"
        reports[rounding] = quantize_calibrated(src, dst, feeds, Int8Recipe(keep=0, activations="per-tensor",
                                                                            weight_rounding=rounding))
        graphs[rounding] = onnx.load(str(dst))
    assert "GPTQ" in reports["gptq"]["weights"] and "nearest" in reports["nearest"]["weights"]
    ints = {r: {i.name: numpy_helper.to_array(i) for i in g.graph.initializer if i.data_type == 3}
            for r, g in graphs.items()}
    assert ints["gptq"].keys() == ints["nearest"].keys()  # same graph, same scales: only the integers move
    changed = [k for k in ints["gptq"] if not np.array_equal(ints["gptq"][k], ints["nearest"][k])]
    assert changed
    # what GPTQ promises, per MatMul: a smaller output error on the calibration inputs, ||X dW||^2 = tr(dW' H dW)
    from clipheads.export.int8_candidates import candidates, measure_local_errors

    fp32 = onnx.load(str(src))
    cands = {c.node: c for c in candidates(fp32, patch_embedding=False)}
    measure_local_errors(src, fp32, list(cands.values()), feeds, tmp_path, grams=True)
    grams = {n: c.input_gram for n, c in cands.items() if c.input_gram is not None}
    w32 = {c.weight: numpy_helper.to_array(i) for c in cands.values() for i in fp32.graph.initializer
           if i.name == c.weight}

    def output_errors(g) -> dict[str, float]:
        inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
        out = {}
        for node in g.graph.node:
            if node.op_type == "MatMulIntegerToFloat" and node.name in cands and node.name in grams:
                d = inits[node.input[1]].astype(np.float64) * inits[node.input[3]] - w32[cands[node.name].weight]
                out[node.name] = float(np.trace(d.T @ grams[node.name] @ d))
        return out
    e_gptq, e_near = output_errors(graphs["gptq"]), output_errors(graphs["nearest"])
    assert e_gptq.keys() == e_near.keys() and len(e_gptq) >= 8
    assert all(e_gptq[k] <= e_near[k] * 1.0001 for k in e_gptq) and sum(e_gptq.values()) < 0.9 * sum(e_near.values())
    with pytest.raises(ValueError, match="weight rounding"):
        Int8Recipe(weight_rounding="stochastic").validate()


def test_the_int8_search_scores_each_task_on_its_own_columns():
    """Two tasks of one class list (two domains of a multi-task head) have equal logit columns: judged
    over the graph's columns together every top-2 margin is 0 and identical outputs scored 0.0, so
    the search never stopped early. Each task is judged on its columns and its bank row's rows."""
    from types import SimpleNamespace

    from clipheads.export.pipeline import _selection_score

    r = np.random.default_rng(0).normal(size=(64, 8))
    two = np.hstack([r, r])
    rows = np.repeat([0, 1], 32)  # the first 32 rows ran with bank row 0, the rest with row 1
    tasks = [SimpleNamespace(task_index=0, logit_slice=(0, 8)), SimpleNamespace(task_index=0, logit_slice=(8, 16))]
    assert _selection_score("real", 0.9, rows, tasks)(two, two) == (True, 1.0)
    # the whole-graph judgement it replaces scored 0.0; identical columns now count once there too
    assert _selection_score("real", 0.9)(two, two)[1] == 1.0
    wrong = two.copy()
    wrong[:32, 8:16] *= -1  # task 2 disagrees on its own rows
    assert _selection_score("real", 0.9, rows, tasks)(two, wrong)[0] is False
    elsewhere = two.copy()
    elsewhere[32:, :] *= -1  # rows of another bank row: not these tasks' business
    assert _selection_score("real", 0.9, rows, tasks)(two, elsewhere) == (True, 1.0)


def test_two_heads_on_one_dataset_give_disjoint_sets_and_keep_each_holdout(micro_backbone, tmp_path):
    """Heads trained on the same folder list its images twice: export draws each image once (gate,
    calibration and selection stay disjoint), and one head's held-out test images are never drawn
    through the other head (which trained on all of them)."""
    from clipheads.training.data.holdout import carve
    from clipheads.training.data.synth import WorldSize, generate_world
    from clipheads.training.fit import resolve_data
    from clipheads.training.preprocess import prepare_pixels

    root = generate_world(tmp_path / "w", seed=5, size=WorldSize(train=3, val=0, test=1), workers=1)
    folder = str(root / "sketch")
    carved = build_method("zeroshot", micro_backbone, TASKS)
    carved.training_record = {"data": {"shapes": folder},
                              "holdout": {"shapes": {"val_fraction": 0.0, "test_fraction": 0.25, "seed": 1}}}
    whole = build_method("zeroshot", micro_backbone, TASKS)
    whole.training_record = {"data": {"shapes": folder}}
    gate, calib = gate_and_calibration([carved, whole], micro_backbone.preprocess, 60, 36, seed=0)
    calib, select = split_selection(calib, 12)
    assert gate.detail["available"] == 96  # 128 images once each, less the 32 held out
    sets = [{p.tobytes() for p in s.pixels} for s in (gate, calib, select)]
    assert [len(s) for s in sets] == [60, 24, 12] and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    held_out = carve(resolve_data({"shapes": folder})["shapes"], 0.0, 0.25, 1).test
    test_px = {prepare_pixels(x.path, micro_backbone.preprocess).tobytes() for x in held_out}
    assert not test_px & (sets[0] | sets[1] | sets[2])
