"""RELIABILITY.md B5 #21: the export CLI exits non-zero when parity fails on a genuinely broken graph.

The broken graph is made inside the real pipeline: `export/pipeline.py`'s `export_image_graph`
is wrapped so that, after the real export wrote the plain image graph, its largest float weight
initializer gets noise. Nothing about the gate is stubbed: the real `check_parity` runs the eager
head against that graph in ONNX Runtime and must refuse it (exit 1, no bundle), while the same head
exported unperturbed exits 0.

Batch sizes: the gate runs eager and ORT in chunks of `check_parity(batch=8)` over the probe
images, then each graph and task on its first image alone (batch 1 must answer as the batch does);
a spy on the gate's ORT sessions checks that both sizes were exercised. A graph whose batch
dimension was fixed at 8 (what a batch-8 trace can leave) passes every chunk of 8 and is caught
only by that batch-1 call.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from clipheads.export import parity as parity_module  # noqa: E402
from clipheads.export import pipeline  # noqa: E402
from clipheads.export.bundle import load_bundle  # noqa: E402
from clipheads.export.cli import main  # noqa: E402
from clipheads.training.artifact import save_head  # noqa: E402
from clipheads.training.methods import TaskSpec, build_method  # noqa: E402

TASK = TaskSpec("shapes", ("circle", "square", "triangle", "star"))
PROBES = 9  # one chunk of 8 and one of 1 through the gate (module doc)


@pytest.fixture(scope="module")
def head_file(micro_backbone, tmp_path_factory) -> str:
    import torch

    torch.manual_seed(0)
    head = build_method("coop", micro_backbone, (TASK,))
    with torch.no_grad():  # away from the init, as tests/test_export.py does, so folding is exercised
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return str(save_head(head.eval(), tmp_path_factory.mktemp("head") / "coop.head.safetensors"))


def perturb_largest_initializer(path, seed: int = 0) -> str:
    """Add noise (half the weight's own std) to the largest float32 initializer of the ONNX file at
    `path`, in place; -> the initializer's name."""
    model = onnx.load(str(path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(target)
    assert w.size >= 256, f"largest float initializer {target.name} has only {w.size} values"
    noise = np.random.default_rng(seed).normal(0.0, 0.5 * float(w.std()) + 1e-2, w.shape).astype(np.float32)
    target.CopyFrom(numpy_helper.from_array((w + noise).astype(np.float32), target.name))
    onnx.save(model, str(path))
    return target.name


@pytest.fixture
def broken_image_graph(monkeypatch):
    """Every plain image graph the pipeline writes is perturbed right after the real export."""
    real = pipeline.export_image_graph
    perturbed: list[str] = []

    def export_then_break(*args, **kwargs):
        path = real(*args, **kwargs)
        perturbed.append(perturb_largest_initializer(path))
        return path

    monkeypatch.setattr(pipeline, "export_image_graph", export_then_break)
    return perturbed


@pytest.fixture
def gate_batches(monkeypatch):
    """Batch sizes the parity gate feeds the image graphs (a spy on its ORT sessions)."""
    real = parity_module._session
    seen: list[int] = []

    class Spy:
        def __init__(self, sess):
            self._sess = sess

        def run(self, outputs, feeds, *rest):
            if "pixels" in feeds:
                seen.append(len(feeds["pixels"]))
            return self._sess.run(outputs, feeds, *rest)

        def __getattr__(self, name):
            return getattr(self._sess, name)

    monkeypatch.setattr(parity_module, "_session", lambda path: Spy(real(path)))
    return seen


def _export(capsys, head_file, out, *extra) -> tuple[int, dict]:
    capsys.readouterr()
    code = main([head_file, "--out", str(out), "--probes", str(PROBES), "--no-text", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_unperturbed_export_exits_0_and_gates_batch_1_and_8(head_file, tmp_path, capsys, gate_batches):
    code, doc = _export(capsys, head_file, tmp_path / "bundle")
    assert code == 0 and doc["ok"] and doc["exit_code"] == 0 and doc["parity"]["passed"], doc["parity"]
    assert sorted(set(gate_batches)) == [1, 8], gate_batches
    worst = doc["parity"]["worst"]
    # B5 #21's fp32 numbers (the gate itself allows 1e-3, parity.GATES): measured 1.2e-6 here
    assert worst["max_abs_logit_diff"] <= 1e-5 and worst["min_feature_cosine"] >= 0.9999, worst
    m = load_bundle(tmp_path / "bundle").manifest
    assert m["parity"]["passed"] and m["parity"]["probe"]["n"] == PROBES


def test_broken_graph_fails_the_gate_exit_1_and_writes_no_bundle(head_file, tmp_path, capsys, broken_image_graph,
                                                                  gate_batches):
    out = tmp_path / "bundle"
    code, doc = _export(capsys, head_file, out)
    assert broken_image_graph, "the pipeline never exported an image graph through export_image_graph"
    assert code == 1 and doc["ok"] is False and doc["exit_code"] == 1, doc
    assert doc["bundle"] is None and not out.exists()
    p = doc["parity"]
    assert p["passed"] is False and p["failures"]
    assert any("max |delta logit|" in f for f in p["failures"]), p["failures"]
    assert p["worst"]["max_abs_logit_diff"] > 1e-3
    assert sorted(set(gate_batches)) == [1, 8], gate_batches


def test_broken_graph_with_allow_parity_failure_still_exits_1_but_writes_the_bundle(
        head_file, tmp_path, capsys, broken_image_graph):
    out = tmp_path / "bundle"
    code, doc = _export(capsys, head_file, out, "--allow-parity-failure")
    assert code == 1 and doc["ok"] is False and doc["exit_code"] == 1
    assert doc["bundle"] == str(out)
    m = load_bundle(out).manifest
    assert m["parity"]["passed"] is False and m["parity"]["failures"]


def test_a_batch_dimension_fixed_at_export_fails_the_gate_at_batch_1(head_file, tmp_path, capsys, monkeypatch):
    real = pipeline.export_image_graph

    def export_with_batch_fixed_at_8(*args, **kwargs):
        path = real(*args, **kwargs)
        model = onnx.load(str(path))
        for inp in model.graph.input:
            inp.type.tensor_type.shape.dim[0].dim_value = 8  # replaces the symbolic batch dimension
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(pipeline, "export_image_graph", export_with_batch_fixed_at_8)
    capsys.readouterr()
    code = main([head_file, "--out", str(tmp_path / "bundle"), "--probes", "16", "--no-text", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["bundle"] is None, doc["parity"]
    assert doc["parity"]["worst"]["max_abs_logit_diff"] <= 1e-5  # every chunk of 8 agreed
    assert any("cannot run one image" in f for f in doc["parity"]["failures"]), doc["parity"]["failures"]
