"""export/: folding, ONNX export, parity gate, bundle contract and CLI, with real ORT sessions."""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from clipheads.training.methods import TaskSpec, build_method, get_method, list_methods

ort = pytest.importorskip("onnxruntime")

from clipheads.export.bundle import BundleError, load_bundle  # noqa: E402
from clipheads.export.fold import FoldError, fold_heads  # noqa: E402
from clipheads.export.pipeline import ExportOptions, ExportUsageError, export_heads  # noqa: E402

TASKS = (TaskSpec("animals", ("cat", "dog", "bird")), TaskSpec("vehicles", ("car", "bus", "boat", "bike")))
FAST = dict(probes=12)


def _head(name, backbone, tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    head = build_method(name, backbone, tasks)
    with torch.no_grad():  # move away from the init (zero adapters, identical prompts) so folding is exercised
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head.eval()


def _session(bundle: Path, name: str):
    return ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])


def _pixels(backbone, n=6, seed=3):
    s = backbone.preprocess.image_size
    return np.random.default_rng(seed).integers(0, 256, (n, 3, s, s), dtype=np.uint8)


def _normalised(backbone, px):
    pre = backbone.preprocess
    m = torch.tensor(pre.mean).view(1, 3, 1, 1)
    s = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (torch.from_numpy(px).float() / 255.0 - m) / s


FOLDABLE = [m for m in list_methods() if get_method(m).foldable]
NOT_FOLDABLE = [m for m in list_methods() if not get_method(m).foldable]


@pytest.mark.parametrize("method", FOLDABLE)
def test_foldable_method_bundle_matches_eager_in_ort(method, micro_backbone, tmp_path):
    head = _head(method, micro_backbone)
    res = export_heads([head], tmp_path / "b", ExportOptions(**FAST))
    assert res.passed, res.parity["failures"]
    assert res.parity["worst"]["max_abs_logit_diff"] <= 1e-3
    assert res.parity["worst"]["min_top1_agreement"] == 1.0
    b = load_bundle(tmp_path / "b")
    m = b.manifest
    # the contract serving/ reads: inputs pixels + task_index, outputs logits + features
    px = _pixels(micro_backbone)
    x = _normalised(micro_backbone, px)
    for t in m["tasks"]:
        g = m["graphs"][t["graph"]]
        assert [i["name"] for i in g["inputs"]] == ["pixels", "task_index"]
        assert [o["name"] for o in g["outputs"]] == ["logits", "features"]
        assert g["inputs"][0]["dtype"] == "uint8" and g["inputs"][0]["shape"][0] == "batch"
        logits, feats = _session(b.root, t["graph"]).run(
            ["logits", "features"], {"pixels": px, "task_index": np.full(len(px), t["task_index"], np.int64)})
        a, z = t["logit_slice"]
        k = [s.name for s in TASKS].index(t["name"])
        with torch.no_grad():
            ref = head.logits(x, k).numpy()
        np.testing.assert_allclose(logits[:, a:z], ref, atol=1e-3, rtol=0)
        assert (logits[:, a:z].argmax(1) == ref.argmax(1)).all()
        np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)
    # text graph: tokens -> normalised features equal to the backbone's
    tok = micro_backbone.tokenize(["a photo of a cat.", "a bus"]).numpy()
    (tf,) = _session(b.root, m["text"]["graph"]).run(["features"], {"tokens": tok})
    with torch.no_grad():
        np.testing.assert_allclose(tf, micro_backbone.encode_text(torch.from_numpy(tok)).numpy(), atol=1e-4)
    assert m["text"]["context_length"] == micro_backbone.context_length


@pytest.mark.parametrize("method", NOT_FOLDABLE or ["<none registered>"])
def test_non_foldable_methods_are_refused(method, micro_backbone):
    if method == "<none registered>":
        pytest.skip("no non-foldable method registered")
    head = build_method(method, micro_backbone, TASKS)
    with pytest.raises(FoldError, match="not foldable"):
        fold_heads([head])


def test_mixed_task_batch_through_the_bank_equals_per_task_calls(micro_backbone, tmp_path):
    tasks = TASKS + (TaskSpec("shapes", ("circle", "square")),)
    head = _head("mmap", micro_backbone, tasks)  # per-task visual prompts -> a bank of 3 rows
    plan = fold_heads([head])
    (graph,) = plan.graphs
    assert graph.kind == "prompt-bank" and graph.encoder.bank_size == 3
    res = export_heads([head], tmp_path / "b", ExportOptions(**FAST))
    assert res.passed, res.parity["failures"]
    b = load_bundle(tmp_path / "b")
    sess = _session(b.root, graph.name)
    px = _pixels(micro_backbone, n=9, seed=5)
    x = _normalised(micro_backbone, px)
    ti = np.array([0, 2, 1, 1, 0, 2, 2, 0, 1], np.int64)
    mixed, _ = sess.run(["logits", "features"], {"pixels": px, "task_index": ti})
    for t in b.manifest["tasks"]:
        k = t["task_index"]
        per_task, _ = sess.run(["logits", "features"], {"pixels": px, "task_index": np.full(9, k, np.int64)})
        rows = ti == k
        np.testing.assert_allclose(mixed[rows], per_task[rows], atol=1e-5, rtol=0)
        a, z = t["logit_slice"]
        with torch.no_grad():
            ref = head.logits(x[torch.from_numpy(rows)], [s.name for s in tasks].index(t["name"])).numpy()
        np.testing.assert_allclose(mixed[rows][:, a:z], ref, atol=1e-3, rtol=0)
    assert res.parity["mixed_batch"][graph.name]["max_abs_diff_vs_per_task"] <= 1e-4
    # a row outside the bank is an error, also a negative one (ONNX Gather would count it from the end)
    for bad in (3, -1, -3):
        with pytest.raises(Exception, match="(?i)indices|out of|bound|range"):
            sess.run(["logits"], {"pixels": px[:2], "task_index": np.array([0, bad], np.int64)})


def test_identical_image_paths_share_one_graph_and_pass(micro_backbone):
    zs = _head("zeroshot", micro_backbone, (TASKS[0],))
    coop = _head("coop", micro_backbone, (TASKS[1], TaskSpec("shapes", ("circle", "square"))))
    vpt = _head("vpt", micro_backbone, (TaskSpec("v1", ("a", "b")), TaskSpec("v2", ("c", "d"))))
    plan = fold_heads([zs, coop, vpt])
    kinds = [g.kind for g in plan.graphs]
    assert kinds == ["plain", "prompt-bank"]
    plain = plan.graphs[0]
    assert [t.name for t in plain.tasks] == ["animals", "vehicles", "shapes"]
    assert [t.logit_slice for t in plain.tasks] == [(0, 3), (3, 7), (7, 9)]
    # VPT shares its prompts across tasks: one bank row, so one encoder pass serves both tasks
    assert plan.graphs[1].encoder.bank_size == 1 and {t.task_index for t in plan.graphs[1].tasks} == {0}
    with pytest.raises(FoldError, match="unique"):
        fold_heads([zs, _head("zeroshot", micro_backbone, (TASKS[0],))])


def test_float32_input_graph(micro_backbone, tmp_path):
    head = _head("vpt", micro_backbone)
    res = export_heads([head], tmp_path / "b", ExportOptions(input_dtype="float32", text=False, **FAST))
    assert res.passed, res.parity["failures"]
    m = load_bundle(tmp_path / "b").manifest
    assert m["preprocess"]["input_dtype"] == "float32" and m["text"] == {}
    g = m["graphs"][m["tasks"][0]["graph"]]
    assert g["inputs"][0]["dtype"] == "float32"


def test_cpu_precisions_report_ort_load_time_fusions(micro_backbone, tmp_path):
    """fp32 leaves LayerNorm/GELU fusions to ORT and reports what its CPU optimiser fuses when it
    loads the graph; forcing the offline transformer fusions (the fp16 recipe) reports those."""
    head = _head("vpt", micro_backbone)
    n = len(micro_backbone.vision_blocks)
    for forced, kind, attention in ((None, "onnxruntime CPU load-time", n), (True, "clip", n),
                                    (False, "onnxruntime CPU load-time", 0)):
        res = export_heads([head], tmp_path / f"b{forced}",
                           ExportOptions(text=False, fuse=forced, fused_attention=forced is not False, **FAST))
        assert res.passed, res.parity["failures"]
        rep = res.manifest["fused_ops"]["image_0.onnx"]
        assert rep["model_type"].startswith(kind), rep
        assert rep["attention_nodes"] == attention, rep
        assert rep["fused"].get("LayerNormalization", 0) + rep["fused"].get("SkipLayerNormalization", 0) >= 2 * n


def test_fp16_gate_passes_and_text_graph_stays_fp32(micro_backbone, tmp_path):
    head = _head("maple", micro_backbone)
    res = export_heads([head], tmp_path / "b", ExportOptions(precision="fp16", **FAST), allow_parity_failure=True)
    assert res.parity["worst"]["min_feature_cosine"] >= 0.999
    assert res.parity["worst"]["max_abs_logit_diff"] < 0.05
    # a random-init micro model puts some probes on decision boundaries: any top-1 flip must be one
    for t in res.parity["tasks"].values():
        assert t["top1_disagreements"] == t["near_tie_disagreements"], t
    assert res.passed == all(t["top1_agreement"] >= 0.995 for t in res.parity["tasks"].values())
    m = load_bundle(tmp_path / "b").manifest
    assert m["graphs"]["image_0.onnx"]["precision"] == "fp16" and m["graphs"]["text.onnx"]["precision"] == "fp32"
    assert m["fused_ops"]["image_0.onnx"]["attention_nodes"] == len(micro_backbone.vision_blocks)
    assert m["parity"]["fp32_reference_graphs"]["passed"]


def test_int8_gate_is_measured_and_enforced(micro_backbone, tmp_path):
    head = _head("zeroshot", micro_backbone)
    res = export_heads([head], tmp_path / "b", ExportOptions(precision="int8", text=False, **FAST),
                       allow_parity_failure=True)
    p = res.parity
    assert p["gate"]["min_top1"] == 0.99
    top1 = p["worst"]["min_top1_agreement"]
    assert 0.0 <= top1 <= 1.0 and p["passed"] == (top1 >= 0.99 and not p["failures"])
    m = load_bundle(tmp_path / "b").manifest  # written despite a failure: allow_parity_failure
    assert m["parity"]["precision"] == "int8" and m["precision"] == "int8"
    # a failing gate writes nothing without allow_parity_failure (forced: an impossible gate)
    from clipheads.export import parity

    strict = dict(parity.GATES)
    strict["int8"] = parity.Gate("int8", 0.0, 1.01, None)
    import unittest.mock as mock

    with mock.patch.dict(parity.GATES, strict):
        res2 = export_heads([head], tmp_path / "c", ExportOptions(precision="int8", text=False, **FAST))
    assert not res2.passed and res2.bundle is None and not (tmp_path / "c").exists()


def test_corrupt_bundles_are_refused(micro_backbone, tmp_path):
    head = _head("zeroshot", micro_backbone, (TASKS[0],))
    res = export_heads([head], tmp_path / "b", ExportOptions(fuse=False, **FAST))
    assert res.passed
    root = tmp_path / "b"
    load_bundle(root)
    mpath = root / "manifest.json"
    good = mpath.read_text()
    # 1. a flipped byte in a graph
    data = bytearray((root / "image_0.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "image_0.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(root)
    load_bundle(root, verify=False)  # the structure itself is fine
    # 2. path traversal in a file name
    m = json.loads(good)
    m["graphs"]["../evil.onnx"] = m["graphs"].pop("text.onnx")
    m["text"]["graph"] = "../evil.onnx"
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="traversal"):
        load_bundle(root, verify=False)
    # 3. unknown format version, 4. not a bundle
    m = json.loads(good)
    m["format_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(root, verify=False)
    with pytest.raises(BundleError, match="not a clipheads bundle"):
        load_bundle(tmp_path)


def test_write_refuses_to_replace_a_foreign_directory(micro_backbone, tmp_path):
    from clipheads.export.bundle import write_bundle

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(BundleError, match="not a clipheads bundle"):
        write_bundle(tmp_path / "precious", {}, {})
    assert (tmp_path / "precious" / "thesis.tex").exists()


# ---- CLI -----------------------------------------------------------------------------------
def _save(head, path):
    from clipheads.training.artifact import save_head

    return str(save_head(head, path))


def test_cli_exports_heads_and_reports_json(micro_backbone, tmp_path, capsys):
    from clipheads.export.cli import main

    a = _save(_head("coop", micro_backbone, (TASKS[0],)), tmp_path / "coop.head.safetensors")
    b = _save(_head("vpt", micro_backbone, (TASKS[1],)), tmp_path / "vpt.head.safetensors")
    code = main([a, b, "--out", str(tmp_path / "bundle"), "--probes", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] and out["parity"]["passed"]
    m = load_bundle(tmp_path / "bundle").manifest
    assert [t["name"] for t in m["tasks"]] == ["animals", "vehicles"]
    assert {t["method"] for t in m["tasks"]} == {"coop", "vpt"}
    assert m["heads"][0]["file"] == a
    for key in ("package_version", "target", "precision", "opset", "runtime_versions", "preprocess", "backbone",
                "graphs", "text", "parity", "fused_ops", "logit_scale"):
        assert key in m, key
    assert m["opset"] == 17 and m["format"] == "clipheads-bundle" and m["format_version"] == 1


@pytest.mark.parametrize("method", NOT_FOLDABLE or ["<none registered>"])
def test_cli_refuses_non_foldable_heads_with_exit_2(method, micro_backbone, tmp_path, capsys):
    if method == "<none registered>":
        pytest.skip("no non-foldable method registered")
    from clipheads.export.cli import main

    h = _save(build_method(method, micro_backbone, TASKS), tmp_path / f"{method}.head.safetensors")
    code = main([h, "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err
    assert code == 2 and "not foldable" in err and method in err
    assert not (tmp_path / "bundle").exists()


def test_cli_bad_input_exit_2(tmp_path, capsys):
    from clipheads.export.cli import main

    bogus = tmp_path / "x.head.safetensors"
    bogus.write_bytes(b"not a head")
    assert main([str(bogus), "--out", str(tmp_path / "o")]) == 2
    assert main([str(tmp_path / "missing.head.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ---- real size -----------------------------------------------------------------------------
@pytest.mark.slow
def test_vit_b32_random_init_zero_shot_passes_fp32_gate(tmp_path):
    from conftest import make_backbone

    bb = make_backbone("ViT-B-32")
    head = build_method("zeroshot", bb, (TaskSpec("pets", ("cat", "dog", "hamster", "parrot", "goldfish")),))
    res = export_heads([head], tmp_path / "b", ExportOptions(probes=8, text=False))  # text: covered on micro
    assert res.passed, res.parity["failures"]
    m = res.manifest
    assert m["graphs"]["image_0.onnx"]["outputs"][0]["shape"] == ["batch", 5]
    assert m["graphs"]["image_0.onnx"]["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    fused = m["fused_ops"]["image_0.onnx"]  # fp32: attention op + what ORT fuses when it loads the graph
    assert fused["model_type"].startswith("onnxruntime CPU load-time")
    assert fused["attention_nodes"] == 12  # one com.microsoft.MultiHeadAttention per block
    assert fused["fused"].get("LayerNormalization", 0) + fused["fused"].get("SkipLayerNormalization", 0) >= 24
    assert res.parity["worst"]["max_abs_logit_diff"] <= 1e-3


def test_bundle_is_served_by_serving_onnx_runtime(micro_backbone, tmp_path):
    """The seam with serving/: its OnnxRuntime opens our bundle and classifies like the eager heads."""
    runtime = pytest.importorskip("clipheads.serving.runtimes")
    zs = _head("zeroshot", micro_backbone, (TASKS[0],))
    mm = _head("mmap", micro_backbone, (TASKS[1], TaskSpec("shapes", ("circle", "square"))))
    res = export_heads([zs, mm], tmp_path / "b", ExportOptions(**FAST))
    assert res.passed, res.parity["failures"]
    rt = runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"])
    px = _pixels(micro_backbone, n=4)
    x = _normalised(micro_backbone, px)
    out = rt.classify(px)
    with torch.no_grad():
        want = {"animals": zs.logits(x, 0), "vehicles": mm.logits(x, 0), "shapes": mm.logits(x, 1)}
    assert set(out) == set(want)
    for name, ref in want.items():
        np.testing.assert_allclose(out[name], ref.numpy(), atol=1e-3, rtol=0)
    feats = rt.encode_texts(["a photo of a cat."])
    with torch.no_grad():
        ref = micro_backbone.encode_text(micro_backbone.tokenize(["a photo of a cat."])).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-4)


def test_small_image_graphs_run_on_one_intra_op_thread(micro_backbone, tmp_path, monkeypatch):
    """A graph whose batch-1 pass is under SMALL_GRAPH_MS gets one intra-op thread (the same answers
    as ORT's default threads); a larger one, or CLIPHEADS_ORT_THREADS, keeps what it asked for."""
    from clipheads.serving.runtimes import onnx_runtime

    res = export_heads([_head("zeroshot", micro_backbone, (TASKS[0],))], tmp_path / "b", ExportOptions(text=False, **FAST))
    assert res.passed, res.parity["failures"]
    px = _pixels(micro_backbone, n=8)
    # the thresholds are pinned: the micro graph takes ~0.5 ms, but a loaded CI machine may stall a pass
    monkeypatch.setattr(onnx_runtime, "SMALL_GRAPH_MS", 1e9)  # every graph is "small" now
    small = onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"])
    assert small.intra_op_threads == (1 if (os.cpu_count() or 1) > 1 else None)
    assert small.describe()["intra_op_threads"] == small.intra_op_threads
    monkeypatch.setattr(onnx_runtime, "SMALL_GRAPH_MS", 0.0)  # every graph is "large" now
    default = onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"])
    assert default.intra_op_threads is None
    monkeypatch.setenv("CLIPHEADS_ORT_THREADS", "3")
    # CLIPHEADS_ORT_THREADS wins over the rule (SMALL_GRAPH_MS is 0 here: every graph "large")
    assert onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"]).intra_op_threads == 3
    monkeypatch.setattr(onnx_runtime, "SMALL_GRAPH_MS", 1e9)
    assert onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"]).intra_op_threads == 3
    for name, logits in small.classify(px).items():
        np.testing.assert_allclose(logits, default.classify(px)[name], atol=1e-5, rtol=0)


def test_split_passes_give_the_one_pass_answers(micro_backbone, tmp_path, monkeypatch):
    """Batches of >= 2 run as two 1-thread half passes at once (split_pass.py): the same logits and
    features as one pass, odd batches and several paths (a prompt bank) included; a batch of one
    keeps the one pass; CLIPHEADS_ORT_SPLIT=1 turns it on, for 2 intra-op threads only. Likewise
    CLIPHEADS_ORT_PASSES=2's 1-thread sessions, run beside a wide pass."""
    from clipheads.serving.runtimes import onnx_runtime
    from clipheads.serving.runtimes.split_pass import passes_wanted, split_wanted

    heads = [_head("zeroshot", micro_backbone, (TASKS[0],)), _head("ivlp", micro_backbone, (TASKS[1],))]
    res = export_heads(heads, tmp_path / "b", ExportOptions(text=False, **FAST))
    assert res.passed, res.parity["failures"]
    one = onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"], split_passes=False)
    split = onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"], split_passes=True)
    assert split.describe()["split_passes"] and not one.describe()["split_passes"]
    assert len(split.paths) >= 2
    calls = []
    real_run = split._split.run
    monkeypatch.setattr(split._split, "run", lambda *a: calls.append(len(a[2]["pixels"])) or real_run(*a))
    for n in (1, 2, 7):
        px = _pixels(micro_backbone, n=n)
        for p in range(len(split.paths)):
            for a, b in zip(split.run_path(p, px), one.run_path(p, px)):
                assert a.shape == b.shape
                np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert calls == [2] * len(split.paths) + [7] * len(split.paths)  # batches of one stayed single passes
    assert split_wanted("1", None, 2) and split_wanted("1", 2, 8)
    assert not split_wanted("1", None, 4) and not split_wanted("1", 1, 2) and not split_wanted("0", None, 2)
    assert passes_wanted("2", None, 2) == passes_wanted("2", 2, 8) == 2
    assert passes_wanted("2", None, 4) == passes_wanted("2", 1, 2) == passes_wanted("1", None, 2) == 1
    monkeypatch.setenv("CLIPHEADS_ORT_THREADS", "2")
    monkeypatch.setattr(onnx_runtime, "SMALL_GRAPH_MS", 0.0)
    assert not onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"]).describe()["split_passes"]
    monkeypatch.setenv("CLIPHEADS_ORT_SPLIT", "1")
    assert onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"]).describe()["split_passes"]
    # CLIPHEADS_ORT_PASSES=2: passes alongside another run on 1-thread sessions, two at once, same answers
    monkeypatch.setenv("CLIPHEADS_ORT_SPLIT", "0")
    assert onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"]).concurrent_passes == 1
    monkeypatch.setenv("CLIPHEADS_ORT_PASSES", "2")
    two = onnx_runtime.OnnxRuntime(tmp_path / "b", providers=["CPUExecutionProvider"])
    assert two.concurrent_passes == 2 and two.describe()["concurrent_passes"] == 2
    px = _pixels(micro_backbone, n=5)
    with ThreadPoolExecutor(2) as pool:
        for p in range(len(two.paths)):
            wide, beside = pool.submit(two.run_path, p, px), pool.submit(two.run_path, p, px, alongside=True)
            for got in (wide.result(), beside.result()):
                for a, b in zip(got, one.run_path(p, px)):
                    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_fused_attention_is_one_contrib_node_per_block_and_exact(micro_backbone, tmp_path):
    from clipheads.export.optimize import op_counts

    head = _head("ivlp", micro_backbone)
    fused = export_heads([head], tmp_path / "f", ExportOptions(text=False, **FAST))
    plain = export_heads([head], tmp_path / "p", ExportOptions(text=False, fused_attention=False, fuse=False, **FAST))
    assert fused.passed and plain.passed
    n_blocks = len(micro_backbone.vision_blocks)
    assert op_counts(tmp_path / "f" / "image_0.onnx").get("com.microsoft.MultiHeadAttention") == n_blocks
    assert not any(k.startswith("com.microsoft") for k in op_counts(tmp_path / "p" / "image_0.onnx"))
    assert fused.parity["worst"]["max_abs_logit_diff"] <= 1e-4
    # the backbone is restored after export: eager reference unchanged
    assert all(type(b.attn).__name__ == "MultiheadAttention" for b in micro_backbone.vision_blocks)


def test_int8_static_qdq_is_calibrated_and_gated(micro_backbone, tmp_path):
    from clipheads.export.optimize import op_counts

    head = _head("vpt", micro_backbone)
    res = export_heads([head], tmp_path / "b", ExportOptions(precision="int8", int8_mode="static", text=False, **FAST),
                       allow_parity_failure=True)
    ops = op_counts(tmp_path / "b" / "image_0.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert res.parity["precision"] == "int8" and 0.0 <= res.parity["worst"]["min_top1_agreement"] <= 1.0
    assert res.parity["worst"]["min_feature_cosine"] > 0.9  # quantized, not broken
    # --int8-activations per-row: the same bundle with each token's own range, named in the manifest
    pr = export_heads([head], tmp_path / "r", ExportOptions(precision="int8", int8_activations="per-row", text=False,
                                                             **FAST), allow_parity_failure=True)
    rec = load_bundle(tmp_path / "r").manifest["int8"]["image_0.onnx"]
    assert rec["activation_ranges"] == "per-row" and {t["activations"] for t in rec["search"]} == {"per-row"}
    assert op_counts(tmp_path / "r" / "image_0.onnx").get("ReduceMax", 0) > 0
    assert pr.parity["worst"]["min_feature_cosine"] > 0.9
    with pytest.raises(ExportUsageError, match="activations"):
        ExportOptions(precision="int8", int8_activations="per-block").validate()
    with pytest.raises(ExportUsageError, match="--fuse does not apply to int8"):
        ExportOptions(precision="int8", fuse=True).validate()  # was accepted and silently not done


def test_dynamo_exporter_passes_the_gate_and_records_its_opset(micro_backbone, tmp_path, caplog):
    """Both exporters are exercised (ECOSYSTEM 3.1); dynamo graphs may declare a newer opset, which
    the manifest records, without the exporter's own logged warnings (and traceback) on stderr."""
    head = _head("vpt", micro_backbone)
    said: list[str] = []
    with caplog.at_level(logging.WARNING):
        res = export_heads([head], tmp_path / "b", ExportOptions(exporter="dynamo", text=False, **FAST),
                           log=said.append)
    assert not [r.getMessage()[:100] for r in caplog.records if r.name.startswith(("onnxscript", "torch.onnx"))]
    # the fused attention node is a TorchScript symbolic: said, and no log line claims it
    assert any("keeps attention as plain ops" in line for line in said)
    assert not any("attention blocks as" in line for line in said)
    assert res.passed, res.parity["failures"]
    m = load_bundle(tmp_path / "b").manifest
    declared = m["graphs"]["image_0.onnx"]["opset"]
    assert m["exporter"] == "dynamo" and m["opset"] == declared and declared >= 17
    assert [i["name"] for i in m["graphs"]["image_0.onnx"]["inputs"]] == ["pixels", "task_index"]
    assert m["graphs"]["image_0.onnx"]["inputs"][0]["shape"][0] == "batch"


@pytest.mark.parametrize("method", ["zeroshot", "coop"])
def test_text_only_heads_on_a_resnet_backbone_export(method, rn_backbone, tmp_path):
    """DESIGN: any open_clip image tower works for text-only methods; the (forced) transformer
    fusions are skipped on it, not failed."""
    head = _head(method, rn_backbone, (TASKS[0],))
    res = export_heads([head], tmp_path / "b", ExportOptions(fuse=True, **FAST))
    assert res.passed, res.parity["failures"]
    assert "skipped" in res.manifest["fused_ops"]["image_0.onnx"]
    assert load_bundle(tmp_path / "b").manifest["tasks"][0]["graph"] == "image_0.onnx"
