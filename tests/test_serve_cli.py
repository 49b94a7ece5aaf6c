"""`clipheads serve` refuses at once (exit 2, one line) what could never serve: out-of-range
numbers, and a runtime this machine cannot open (TensorRT without the package or engines, ORT CUDA
without its provider), instead of a server that is never ready or an encoder restarting forever."""
from __future__ import annotations

import importlib.util

import pytest

from test_serving import make_micro_head


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return make_micro_head(tmp_path_factory.mktemp("head"))


@pytest.mark.parametrize("flags", [["--timeout", "-1"], ["--timeout", "0"], ["--max-concurrency", "0"],
                                   ["--grace", "-3"], ["--body-timeout", "-1"], ["--port", "99999"],
                                   ["--port", "0"], ["--timeout", "soon"]])
def test_numbers_that_cannot_serve_are_refused(head, flags, capsys):
    from clipheads.serving.cli import main

    assert main([str(head), *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert flags[0] in err and len(err.splitlines()) == 1, err


def test_a_runtime_this_machine_cannot_open_is_refused_up_front(micro_backbone, tmp_path, capsys):
    import onnxruntime as ort

    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.serving.cli import main
    from clipheads.serving.startup import startup_problem
    from clipheads.training.methods import TaskSpec, build_method

    bundle = tmp_path / "b"
    assert export_heads([build_method("zeroshot", micro_backbone, (TaskSpec("t", ("a", "b")),))], bundle,
                        ExportOptions(probes=4, text=False)).passed
    if importlib.util.find_spec("tensorrt") is None:
        assert main([str(bundle), "--runtime", "tensorrt", "--dry-run"]) == 2
        assert "needs the tensorrt package" in capsys.readouterr().err
        assert "tensorrt package" in startup_problem(str(bundle), "", 1, "tensorrt")  # what `bentoml serve` checks
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main([str(bundle), "--runtime", "onnx-cuda", "--dry-run"]) == 2
        assert "onnx-cuda needs onnxruntime-gpu" in capsys.readouterr().err
    assert main([str(bundle), "--runtime", "onnx-cpu", "--dry-run"]) == 0


def test_the_reliability_defaults_are_pinned(monkeypatch):
    """RELIABILITY.md B5's defaults, with no CLIPHEADS_* variable set: 20 MB bodies, 40 MP images,
    30 s per request, 30 s of drain, loopback only (every other test overrides some of them)."""
    import os

    from clipheads.serving.cli import build_parser
    from clipheads.serving.front.config import ServeConfig

    for k in list(os.environ):
        if k.startswith("CLIPHEADS_"):
            monkeypatch.delenv(k)
    cfg = ServeConfig.from_env()
    assert (cfg.max_body_bytes, cfg.max_pixels, cfg.timeout_s, cfg.grace_s) == (20 * 1024 * 1024, 40_000_000, 30, 30)
    assert (cfg.body_timeout_s, cfg.header_timeout_s) == (10.0, 10.0)
    args = build_parser().parse_args(["bundle/"])
    assert (args.host, args.grace) == ("127.0.0.1", 30)
