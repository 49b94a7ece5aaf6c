"""The int8 export review: a reused workdir calibrates afresh, ResNet Convs stay fp32, an unreadable
training image is skipped (not a traceback), int8-only options are refused where they would be
ignored or overridden, and the report says how many images the sensitivity ranking used."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")

from clipheads.export import pipeline  # noqa: E402
from clipheads.export.cli import main  # noqa: E402
from clipheads.export.gate_images import gate_and_calibration, world_images  # noqa: E402
from clipheads.export.pipeline import ExportOptions, ExportUsageError, export_heads  # noqa: E402
from clipheads.training.methods import TaskSpec, build_method  # noqa: E402

TASKS = (TaskSpec("shapes", ("circle", "square", "triangle", "star")),)
SMALL = dict(precision="int8", text=False, probes=12, calibration_images=16, selection_images=16)


def _head(name, backbone, seed):
    torch.manual_seed(seed)
    h = build_method(name, backbone, TASKS)
    with torch.no_grad():  # away from the init, where prompts and adapters are exactly zero / identical
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return h.eval()


def _activation_scales(path) -> dict:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]]))
            for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits}


# ---- 1. a fresh calibration cache per quantization ----------------------------------------------
def test_a_reused_workdir_calibrates_each_export_afresh(micro_backbone, tmp_path):
    a, b = _head("vpt", micro_backbone, 0), _head("vpt", micro_backbone, 1)
    shared = tmp_path / "shared"
    shared.mkdir()
    export_heads([a], None, ExportOptions(**SMALL), workdir=shared)
    a_scales = _activation_scales(shared / "int8_image_0.onnx")
    export_heads([b], None, ExportOptions(**SMALL), workdir=shared)
    reused = _activation_scales(shared / "int8_image_0.onnx")
    (tmp_path / "fresh").mkdir()
    export_heads([b], None, ExportOptions(**SMALL), workdir=tmp_path / "fresh")
    fresh = _activation_scales(tmp_path / "fresh" / "int8_image_0.onnx")
    assert reused and reused == fresh  # head B's own ranges, not head A's
    assert any(a_scales.get(t) != s for t, s in fresh.items())  # (A's would have differed)
    assert not (shared / "q_image_0.onnx" / "calibration.json").exists()
    # another calibration method in the same workdir: calibrated, not ORT's "cache was produced with MinMax"
    res = export_heads([b], None, ExportOptions(**SMALL, calibration_method="percentile"), workdir=shared)
    assert res.manifest["int8"]["image_0.onnx"]["recipe"]["calibrate_method"] == "percentile"


# ---- 2. 1x1 Convs are no patch embedding ---------------------------------------------------------
def test_no_resnet_conv_is_int8_but_the_vit_patch_conv_is_a_candidate(rn_backbone, micro_zeroshot_graph, tmp_path):
    import onnx

    from clipheads.export.int8_candidates import candidates

    assert [c.kind for c in candidates(onnx.load(str(micro_zeroshot_graph)))].count("Conv") == 1
    res = export_heads([_head("zeroshot", rn_backbone, 0)], None, ExportOptions(**SMALL), workdir=tmp_path)
    rep = res.manifest["int8"]["image_0.onnx"]
    assert not any("Conv" in k["node"] for k in rep["kept_fp32"] + rep["most_sensitive"])
    g = onnx.load(str(tmp_path / "int8_image_0.onnx")).graph
    dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in g.node if "Conv" in n.op_type]
    assert len(convs) > 10 and all(n.op_type == "Conv" for n in convs)  # no QLinearConv / ConvInteger
    assert not [n.name for n in convs if any(i in dq for i in n.input)]  # no Q/DQ around any of them
    assert candidates(onnx.load(str(tmp_path / "plain_image_0.onnx"))) and \
        not [c for c in candidates(onnx.load(str(tmp_path / "plain_image_0.onnx"))) if c.kind == "Conv"]


# ---- 3. an unreadable training image --------------------------------------------------------------
@pytest.fixture
def corrupt_head(micro_backbone, tmp_path):
    from clipheads.training.data.synth import WorldSize, generate_world

    root = generate_world(tmp_path / "w", seed=3, size=WorldSize(train=2, val=1, test=1), workers=1)
    folder = root / "sketch"
    files = sorted(folder.glob("*/*.png"))
    files[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # a truncated PNG
    h = build_method("zeroshot", micro_backbone, TASKS).eval()
    h.training_record = {"data": {"shapes": str(folder)}}
    return h, len(files)


def test_an_unreadable_training_image_is_skipped_and_counted(corrupt_head, micro_backbone, tmp_path):
    head, n_files = corrupt_head
    n = n_files + 20  # more than there are: every file is drawn, the corrupt one too
    gate, calib = gate_and_calibration([head], micro_backbone.preprocess, n - 16, 16, seed=0)
    assert (len(gate.pixels), len(calib.pixels)) == (n - 16, 16)
    assert gate.source == "head data + synthetic world" and gate.detail["unreadable"] == 1
    assert (gate.detail["from_head_data"], gate.detail["from_world"]) == (n_files - 1, 21)
    assert calib.detail["unreadable"] == 1
    few, _ = gate_and_calibration([head], micro_backbone.preprocess, 8, 0, seed=0)  # the draw still gives 8
    assert len(few.pixels) == 8 and few.source == "head data"
    # the export goes on (exit 0, a JSON document), its manifest counting the skipped file
    from clipheads.training.artifact import save_head

    path = save_head(head, tmp_path / "zs.head.safetensors")
    out = tmp_path / "b"
    code = main([str(path), "--out", str(out), "--precision", "int8", "--no-text", "--probes", str(n_files),
                 "--calibration-images", "8", "--selection-images", "8", "--json", "-q"])
    assert code == 0
    from clipheads.export.bundle import load_bundle

    m = load_bundle(out).manifest
    assert m["parity"]["probe"]["unreadable"] == 1 and m["int8"]["image_0.onnx"]["calibration"]["unreadable"] == 1


# ---- 4/5. refused option combinations ----------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(precision="int8", calibration_images=4), "at least 8 calibration images"),
    (dict(precision="int8", calibration_images=7), "at least 8 calibration images"),
    (dict(precision="int8", selection_images=5), "--selection-images must be 0 .* or at least 8"),
    (dict(precision="int8", selection_images=1), "--selection-images"),
    (dict(precision="int8", int8_keep=-7), "--int8-keep must be >= 0"),
    (dict(precision="int8", int8_mode="dynamic", int8_keep=-7), "--int8-keep must be >= 0"),
    (dict(precision="fp32", calibration_images=-1), "--calibration-images must be >= 0"),
    (dict(precision="fp32", int8_keep=2), "--int8-keep applies to static int8 only.*--precision fp32"),
    (dict(precision="fp16", calibration_method="entropy"), "--calibration-method applies.*--precision fp16"),
    (dict(precision="fp16", int8_activations="per-row", selection_images=0),
     "--selection-images, --int8-activations apply to static int8 only"),
    (dict(precision="int8", int8_mode="dynamic", calibration_images=8), "--calibration-images.*--int8-mode dynamic"),
    (dict(precision="int8", int8_mode="dynamic", int8_activations="per-tensor"), "--int8-activations"),
    (dict(precision="fp16", int8_mode="dynamic"), "--int8-mode dynamic applies to --precision int8, not fp16"),
], ids=["calib4", "calib7", "select5", "select1", "keep-neg", "keep-neg-dynamic", "calib-neg-fp32", "keep-fp32",
        "method-fp16", "two-fp16", "calib-dynamic", "act-dynamic", "mode-fp16"])
def test_static_int8_options_are_refused_where_they_would_be_ignored_or_overridden(kw, match):
    with pytest.raises(ExportUsageError, match=match):
        ExportOptions(**kw).validate()


def test_plain_invocations_and_the_smallest_sets_still_validate():
    from clipheads.export.cli import _parser

    args = _parser().parse_args(["h.head.safetensors", "--out", "b"])
    for flag, attr in pipeline.STATIC_INT8_FLAGS:  # the CLI's defaults are the ones left unrefused
        assert getattr(args, flag[2:].replace("-", "_")) == \
            ExportOptions.__dataclass_fields__[attr].default, flag
    for kw in (dict(), dict(precision="fp16"), dict(precision="int8"), dict(precision="int8", int8_mode="dynamic"),
               dict(precision="int8", calibration_images=8, selection_images=0),
               dict(precision="int8", calibration_images=8, selection_images=8, int8_keep=0)):
        ExportOptions(**kw).validate()




@pytest.mark.parametrize("extra, needle", [
    (["--precision", "int8", "--calibration-images", "4"], "--calibration-images"),
    (["--precision", "int8", "--selection-images", "5"], "--selection-images"),
    (["--precision", "fp16", "--int8-keep", "-7"], "--int8-keep"),
    (["--precision", "int8", "--int8-mode", "dynamic", "--calibration-method", "percentile"], "--calibration-method"),
], ids=["calib4", "select5", "keep-neg-fp16", "method-dynamic"])
def test_the_cli_refuses_them_as_bad_input(extra, needle, tmp_path, capfd, no_work):
    capfd.readouterr()
    assert main(["h.head.safetensors", "--out", str(tmp_path / "b"), *extra, "--json"]) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in err and needle in err.splitlines()[-1]
    doc = json.loads(out)
    assert doc["exit_code"] == 2 and needle in doc["error"]


# ---- 6. the images the sensitivity ranking used ----------------------------------------------------
def test_the_report_records_the_images_the_sensitivity_ranking_used(micro_backbone, micro_zeroshot_graph, tmp_path):
    from clipheads.export.quantize import Int8Recipe, image_feeds, quantize_calibrated

    feeds = image_feeds(world_images(micro_backbone.preprocess, 24, seed=1).pixels, [0], batch=8)
    logs: list[str] = []
    rep = quantize_calibrated(micro_zeroshot_graph, tmp_path / "a.onnx", feeds,
                              Int8Recipe(keep=1, activations="per-tensor", sensitivity_budget_s=1e-6),
                              lambda ref, got: (False, 0.0), logs.append, workdir=tmp_path)
    assert rep["recipe"]["sensitivity_images"] == 64 and rep["sensitivity_images_used"] == 8  # the budget's floor
    assert any("ranking" in line and "on 8 images" in line for line in logs)
    rep = quantize_calibrated(micro_zeroshot_graph, tmp_path / "b.onnx", feeds, Int8Recipe(activations="per-tensor"),
                              lambda ref, got: (True, 1.0))
    assert rep["sensitivity_images_used"] == 0  # nothing ranked: keeping none passed


def test_two_labels_with_one_embedding_are_no_endless_tie_for_the_agreement():
    """Columns equal on every row (labels the tokenizer reads alike) count once: before, every row's
    top-2 margin was 0 and expected agreement said 66% for a graph equal to the reference."""
    import numpy as np

    from clipheads.export.parity import agreement

    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (64, 3))
    ref = np.concatenate([ref[:, :1], ref[:, :1], ref[:, 1:]], axis=1)  # "cat", "Cat", "dog", "bird"
    a = agreement(ref, ref.copy())
    assert a["expected_agreement"] == 1.0 and a["top1_agreement"] == 1.0
    noisy = ref + rng.normal(0, 1e-4, ref.shape) * np.array([1, 1, 1, 1])
    noisy[:, 1] = noisy[:, 0]  # the graph computes the two tied columns alike too
    assert agreement(ref, noisy)["expected_agreement"] > 0.99
