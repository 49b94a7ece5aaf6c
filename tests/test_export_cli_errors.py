"""`clipheads export` keeps the CLI conventions (training/console.py) on its own error paths: a
`--out` that is not a bundle, bad usage, an unsupported `--opset` are bad input (exit 2, one
`clipheads export: error: ...` line, a JSON error document under --json), found before any work;
`-q` int8 exports print nothing (onnxruntime's quantizer logs on the root logger)."""
from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("onnxruntime")

from clipheads.export import pipeline  # noqa: E402
from clipheads.export.bundle import BundleError, load_bundle  # noqa: E402
from clipheads.export.cli import main  # noqa: E402
from clipheads.export.pipeline import ExportOptions, ExportUsageError  # noqa: E402
from clipheads.training.artifact import save_head  # noqa: E402
from clipheads.training.methods import TaskSpec, build_method  # noqa: E402

PETS = TaskSpec("pets", ("cat", "dog", "bird"))


@pytest.fixture(scope="module")
def head_file(micro_backbone, tmp_path_factory) -> str:
    return str(save_head(build_method("zeroshot", micro_backbone, (PETS,)),
                         tmp_path_factory.mktemp("head") / "zs.head.safetensors"))




def _bad_input(capfd, argv: list[str]) -> str:
    """main(argv + --json) is bad input: exit 2, one error line, a JSON error document; -> the error."""
    capfd.readouterr()
    assert main([*argv, "--json"]) == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "usage:" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit_code"] == 2 and doc["error"]
    return lines[-1]


@pytest.mark.parametrize("target", ["foreign-dir", "head-file", "under-a-file", "unwritable"])
def test_out_that_is_not_a_bundle_is_refused_up_front(target, head_file, tmp_path, capfd, no_work):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    out = {"foreign-dir": foreign, "head-file": head_file, "under-a-file": f"{head_file}/bundle",
           "unwritable": "/proc/clipheads-bundle"}[target]  # /proc: a folder no one can write, root included
    line = _bad_input(capfd, [head_file, "--out", str(out)])
    assert line.startswith("clipheads export: error: ") and "bundle" in line
    assert (foreign / "keep.txt").read_text() == "mine"


def test_library_export_checks_out_before_folding(micro_backbone, tmp_path, no_work):
    (tmp_path / "keep.txt").write_text("mine")
    head = build_method("zeroshot", micro_backbone, (PETS,))
    with pytest.raises(BundleError, match="not a clipheads bundle"):
        pipeline.export_heads([head], tmp_path, ExportOptions(probes=4))


def test_an_existing_bundle_is_still_replaced(head_file, tmp_path, capfd):
    out = tmp_path / "bundle"
    for _ in range(2):
        assert main([head_file, "--out", str(out), "--probes", "4", "--no-text", "-q"]) == 0
    assert load_bundle(out).manifest["tasks"][0]["name"] == "pets"


@pytest.mark.parametrize("argv", [
    ["HEAD", "--out", "b", "--max-batch", "abc"],
    ["HEAD"],  # no --out
    ["HEAD", "--out", "b", "--precision", "int4"],
    ["build-engine", "b", "--workspace-gb", "lots"],
], ids=["max-batch", "no-out", "precision", "build-engine"])
def test_bad_usage_is_one_line_and_a_json_error(argv, head_file, capfd):
    line = _bad_input(capfd, [head_file if a == "HEAD" else a for a in argv])
    prog = "clipheads export build-engine" if argv[0] == "build-engine" else "clipheads export"
    assert line.startswith(f"{prog}: error: ") and f"`{prog} --help`" in line


@pytest.mark.parametrize("opset", [12, 13, 24, 99])
def test_unsupported_opset_is_bad_input_naming_the_range(opset, head_file, tmp_path, capfd, no_work):
    line = _bad_input(capfd, [head_file, "--out", str(tmp_path / "b"), "--opset", str(opset)])
    assert "--opset" in line and "14..23" in line and str(opset) in line
    with pytest.raises(ExportUsageError, match="14..23"):
        ExportOptions(opset=opset).validate()


@pytest.mark.parametrize("opset", [14, 23])
def test_the_ends_of_the_opset_range_export_and_pass(opset, micro_backbone, tmp_path):
    res = pipeline.export_heads([build_method("zeroshot", micro_backbone, (PETS,))], tmp_path / "b",
                                ExportOptions(opset=opset, probes=8))
    assert res.passed, res.parity["failures"]
    assert res.manifest["opset"] == opset and "opset_requested" not in res.manifest


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quiet_int8_export_prints_nothing(mode, head_file, tmp_path, capfd, caplog):
    """onnxruntime's "Please consider to run pre-processing" goes to the root logger: under pytest its
    capture handler (caplog) would hold it; in a CLI process, open_clip's basicConfig prints it."""
    capfd.readouterr()
    argv = [head_file, "--out", str(tmp_path / "b"), "--precision", "int8", "--int8-mode", mode, "--probes", "8",
            *(["--calibration-images", "8", "--selection-images", "0"] if mode == "static" else []), "-q"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert err == "" and "pre-processing" not in caplog.text, err + caplog.text
    assert out.startswith("PASS int8")


def test_quantizer_root_logs_go_to_our_log_only(caplog):
    from clipheads.export.quantize import ort_logs_to

    lines: list[str] = []
    with ort_logs_to(lines.append):
        logging.warning("Please consider to run pre-processing before quantization. ")
        logging.getLogger("someone.else").warning("not onnxruntime's")
    logging.warning("after")
    assert lines == ["onnxruntime: Please consider to run pre-processing before quantization."]
    assert "pre-processing" not in caplog.text
    assert "not onnxruntime's" in caplog.text and "after" in caplog.text
