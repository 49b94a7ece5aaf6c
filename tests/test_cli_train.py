"""`clipheads train / eval / info / methods` in-process on a generated ImageFolder (STYLE.md 6)."""
from __future__ import annotations

import json

from conftest import _register_test_configs
from test_foundation import make_colour_folder
from clipheads.training.cli import main


def test_train_eval_info_round_trip(tmp_path, capsys):
    _register_test_configs()
    data = make_colour_folder(tmp_path / "colours")
    head = tmp_path / "colours.head.safetensors"
    common = ["--backbone", "test-vit-micro", "--pretrained", "none"]
    assert main(["train", "--method", "coop", "--set", "n_ctx=4", "--data", str(data), "--out", str(head),
                 "--epochs", "3", "--batch-size", "8", "--lr", "0.05", "--warmup-epochs", "0", "--json", *common]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["trainable_parameters"] == 4 * 32
    assert trained["metrics"]["final_loss"] < trained["metrics"]["first_loss"]
    assert main(["info", str(head), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tasks"][0]["classes"] == 3 and info["training"]["epochs"] == 3
    assert main(["eval", str(head), "--data", str(data), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["results"]["colours"]["n"] == 24


def test_bad_inputs_exit_2(tmp_path, capsys):
    _register_test_configs()
    common = ["--backbone", "test-vit-micro", "--pretrained", "none"]
    data = make_colour_folder(tmp_path / "colours")
    out = str(tmp_path / "x.head.safetensors")
    assert main(["train", "--method", "nope", "--data", str(data), "--out", out, *common]) == 2
    assert "known methods" in capsys.readouterr().err
    assert main(["train", "--method", "coop", "--data", str(tmp_path / "missing"), "--out", out, *common]) == 2
    assert main(["info", str(tmp_path / "missing.head.safetensors")]) == 2


def test_methods_lists_every_registered_method(capsys):
    from clipheads.training.methods import list_methods

    _register_test_configs()
    assert main(["methods", "--backbone", "test-vit-micro", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert set(rows) == set(list_methods())
    assert rows["zeroshot"]["trainable"] == 0 and rows["coop"]["foldable"]
