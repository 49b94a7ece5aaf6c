"""A bundle's manifest cannot make a runtime load a graph it does not list (and so never
sha256-checks): task and text `graph` entries must name files of `graphs` (runtimes/bundle.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from clipheads.export.pipeline import ExportOptions, export_heads
from clipheads.serving.runtimes import OnnxRuntime, RuntimeError_
from clipheads.training.methods import TaskSpec, build_method


@pytest.fixture(scope="module")
def bundle(micro_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    head = build_method("zeroshot", micro_backbone, (TaskSpec("pets", ("cat", "dog")),))
    assert export_heads([head], out, ExportOptions(probes=4)).passed
    return out


@pytest.mark.parametrize("where, graph", [("task", "../outside/image_0.onnx"), ("task", "./image_0.onnx"),
                                          ("text", "../outside/text.onnx"), ("task", "unlisted.onnx")])
def test_a_graph_the_manifest_does_not_list_is_refused(bundle, tmp_path, where, graph):
    evil = tmp_path / "evil"
    shutil.copytree(bundle, evil)
    (tmp_path / "outside").mkdir()
    for f in ("image_0.onnx", "text.onnx"):
        shutil.copy(bundle / f, tmp_path / "outside" / f)
    m = json.loads((evil / "manifest.json").read_text())
    if where == "task":
        for t in m["tasks"]:
            t["graph"] = graph
    else:
        m["text"]["graph"] = graph
    (evil / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RuntimeError_, match="not listed in the manifest's graphs"):
        OnnxRuntime(evil)
    assert OnnxRuntime(bundle).paths  # the untouched bundle loads
