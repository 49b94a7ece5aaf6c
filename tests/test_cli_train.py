"""`clipheads train / eval / info / methods` in-process on a generated ImageFolder (STYLE.md 6)."""
from __future__ import annotations

import json

from conftest import _register_test_configs
from test_foundation import make_colour_folder
from clipheads.training.cli import main


def test_train_eval_info_round_trip(tmp_path, capsys):
    """An unsplit ImageFolder with --test-fraction: training holds 2 of each class's 8 images out,
    records fractions and seed, and a later `eval` scores exactly those images."""
    _register_test_configs()
    data = make_colour_folder(tmp_path / "colours")
    head = tmp_path / "colours.head.safetensors"
    common = ["--backbone", "test-vit-micro", "--pretrained", "none"]
    assert main(["train", "--method", "coop", "--set", "n_ctx=4", "--data", str(data), "--out", str(head),
                 "--test-fraction", "0.25", "--epochs", "3", "--batch-size", "8", "--lr", "0.05",
                 "--warmup-epochs", "0", "--json", *common]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["trainable_parameters"] == 4 * 32
    assert trained["metrics"]["final_loss"] < trained["metrics"]["first_loss"]
    assert trained["holdout"]["colours"]["counts"] == {"train": 18, "val": 0, "test": 6}
    assert trained["data"]["colours"] == str(data.resolve())  # absolute: the head may move
    assert main(["info", str(head), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tasks"][0]["classes"] == 3 and info["training"]["epochs"] == 3
    assert main(["eval", str(head), "--data", str(data), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["results"]["colours"]["n"] == 6 and ev["results"]["colours"]["split"] == "test"
    # the same images another way: other fractions than its holdout, or the folder under its reader's
    # name, would put training images in the "test" split; the head's own fractions give its holdout
    for other in (["--test-fraction", "0.5"], ["--test-fraction", "0.25", "--split-seed", "2"]):
        assert main(["eval", str(head), "--data", str(data), *other, "-q"]) == 2, other
        assert "are images this head trained on" in capsys.readouterr().err
    assert main(["eval", str(head), "--data", f"image_folder:{data}", "-q"]) == 2
    assert "are images this head trained on" in capsys.readouterr().err
    assert main(["eval", str(head), "--data", str(data), "--test-fraction", "0.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["colours"]["n"] == 6
    assert main(["info", str(head)]) == 0
    text = capsys.readouterr().out
    assert "test 0.25 (seed 1)" in text and "{" not in text  # readable, not a dict repr


def test_eval_on_training_images_is_refused_or_labelled(tmp_path, capsys):
    """Issue 15.5: a head trained on an unsplit folder must not report a 'test' score on it."""
    _register_test_configs()
    data = make_colour_folder(tmp_path / "colours", per_class=3)
    head = tmp_path / "c.head.safetensors"
    common = ["--backbone", "test-vit-micro", "--pretrained", "none"]
    assert main(["train", "--method", "coop", "--data", str(data), "--out", str(head), "--epochs", "1",
                 "--batch-size", "9", "-q", *common]) == 0
    capsys.readouterr()
    assert main(["eval", str(head), "--data", str(data), "-q"]) == 2
    err = capsys.readouterr().err
    assert "trained on" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["eval", str(head), "--data", str(data), "--split", "train", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"]["colours"]
    assert r["split"] == "train" and r["on_training_images"] is True and r["n"] == 9
    other = make_colour_folder(tmp_path / "elsewhere", per_class=2)  # never trained on: every image is held out
    assert main(["eval", str(head), "--data", str(other), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"]["elsewhere"]
    assert r["split"] == "all" and "on_training_images" not in r


def test_bad_inputs_exit_2(tmp_path, capsys):
    _register_test_configs()
    common = ["--backbone", "test-vit-micro", "--pretrained", "none"]
    data = make_colour_folder(tmp_path / "colours")
    out = str(tmp_path / "x.head.safetensors")
    assert main(["train", "--method", "nope", "--data", str(data), "--out", out, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipheads train: error:") and "choose from" in err and "coop" in err
    assert main(["train", "--method", "coop", "--data", str(tmp_path / "missing"), "--out", out, *common]) == 2
    assert main(["info", str(tmp_path / "missing.head.safetensors")]) == 2
    capsys.readouterr()
    base = ["train", "--method", "coop", "--data", str(data), "--out", out, "--epochs", "1", *common]
    recipe = tmp_path / "typo.json"
    recipe.write_text(json.dumps({"method": "coop", "train": {"epoch": 1}}))
    bad_value = tmp_path / "value.json"
    bad_value.write_text(json.dumps({"method": "coop", "train": {"lr": "fast"}}))
    for extra, says in [(["--epochs", "0"], "epochs must be an integer >= 1"),
                        (["--batch-size", "0"], "batch_size must be"), (["--lr", "-1"], "lr must be a number > 0"),
                        (["--optimizer", "adam"], "optimizer must be one of"), (["--precision", "bf16"], "precision must be"),
                        (["--crop-scale", "0.5", "0.1"], "crop_scale must be"),
                        (["--recipe", str(recipe)], "unknown train setting(s) ['epoch']"),
                        (["--recipe", str(bad_value)], "lr must be a number > 0 (got 'fast')"),
                        (["--set", "n_ctx=abc"], "n_ctx='abc' (expected int)"),
                        (["--set", "n_ctx=16"], "ctx_init=null"),  # more vectors than the init phrase has tokens
                        (["--set", "class_token_position=middle"], "init phrase places the context")]:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the backbone's one informational line, if it loaded
        assert last.startswith("clipheads train: error:") and says in last and "Traceback" not in err, err
    assert not (tmp_path / "x.head.safetensors").exists()  # nothing written by a refused run


def test_methods_lists_every_registered_method(capsys):
    from clipheads.training.methods import list_methods

    _register_test_configs()
    assert main(["methods", "--backbone", "test-vit-micro", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert set(rows) == set(list_methods())
    assert rows["zeroshot"]["trainable"] == 0 and rows["coop"]["foldable"]


def test_quiet_means_quiet_on_a_random_init_backbone(tmp_path, capfd):
    """open_clip warns on the root logger that a model "initialized randomly"; asked for with
    `--pretrained none`, that is no warning, and under -q nothing but the result is printed."""
    import logging

    _register_test_configs()
    data = make_colour_folder(tmp_path / "colours", per_class=2)
    import sys

    stderr = logging.StreamHandler(sys.stderr)  # what the first root warning installs in a real process
    logging.getLogger().addHandler(stderr)
    try:
        capfd.readouterr()
        assert main(["eval", "--backbone", "test-vit-micro", "--pretrained", "none", "--data", str(data), "-q"]) == 0
        out, err = capfd.readouterr()
    finally:
        logging.getLogger().removeHandler(stderr)
    assert err == "" and "top-1" in out
