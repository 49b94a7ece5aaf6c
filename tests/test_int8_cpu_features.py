"""Static int8 bundles name the CPU their gate ran on; ONNX Runtime on a CPU without VNNI/AMX (whose
int8 GEMM may saturate) warns (export/cpu_features.py)."""
from __future__ import annotations

import logging

import pytest

pytest.importorskip("onnxruntime")

from clipheads.export import cpu_features  # noqa: E402
from clipheads.export.pipeline import ExportOptions, export_heads  # noqa: E402
from clipheads.training.methods import TaskSpec, build_method  # noqa: E402


@pytest.fixture(scope="module")
def int8_bundle(micro_backbone, tmp_path_factory):
    head = build_method("zeroshot", micro_backbone, (TaskSpec("t", ("red", "green", "blue")),))
    out = tmp_path_factory.mktemp("int8") / "b"
    res = export_heads([head], out, ExportOptions(precision="int8", probes=8, calibration_images=8,
                                                  selection_images=0, text=False), allow_parity_failure=True)
    return res


def test_the_manifest_names_the_cpu_the_int8_gate_ran_on(int8_bundle):
    assert int8_bundle.manifest["int8_exported_on"] == cpu_features.int8_features()


def test_a_cpu_without_vnni_warns_and_one_with_it_does_not(int8_bundle, monkeypatch, caplog):
    from clipheads.serving.runtimes import open_runtime

    for feats, warned in (({"cpu": "old AVX2 box", "vnni": False, "amx_int8": False}, True),
                          ({"cpu": "VNNI box", "vnni": True, "amx_int8": False}, False)):
        monkeypatch.setattr(cpu_features, "int8_features", lambda f=feats: f)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipheads.serving"):
            open_runtime(int8_bundle.bundle, "onnx-cpu")
        assert any("can saturate" in r.getMessage() for r in caplog.records) == warned, feats


def test_flags_are_read_from_cpuinfo():
    feats = cpu_features.int8_features()
    assert feats == {} or set(feats) == {"cpu", "vnni", "amx_int8"}
    assert cpu_features.exact_int8_sums({"amx_int8": True}) and not cpu_features.exact_int8_sums({})

