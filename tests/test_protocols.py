"""Protocol runner + report end to end on tiny generated data with a real (tiny) CLIP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_backbone
from test_foundation import make_colour_folder
from clipheads.training.protocols.recipes import Recipe, list_recipes, load_recipe
from clipheads.training.protocols.report import write_report
from clipheads.training.protocols.runner import run_recipe

FAST_TRAIN = {"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup_epochs": 0, "max_steps_per_epoch": 2}
PROTOCOL_METHODS = ["zeroshot", "coop", "maple", "mma", "comma", "mmap"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("proto")
    for d in ("a", "b"):
        make_colour_folder(root / d, per_class=6)
    return root


def _recipe(method: str, protocol: str, datasets: list[dict]) -> Recipe:
    return Recipe.from_json({"name": f"{method}_{protocol}", "method": method, "protocol": protocol,
                             "train": FAST_TRAIN, "shots": [4], "seeds": [1, 2], "datasets": datasets})


def test_packaged_recipes_parse_and_name_known_methods_and_readers():
    from clipheads.training.data.readers import list_readers
    from clipheads.training.methods import get_method

    names = list_recipes()
    assert len(names) >= 20
    for n in names:
        r = load_recipe(n)
        get_method(r.method).Config.from_dict(r.method_config)  # every config key is a real field
        assert all(d.reader in list_readers() for d in r.datasets)


@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_base_to_novel_and_multi_task_end_to_end(method, folders, tmp_path):
    bb = make_backbone("test-vit-micro", seed=2)
    ds = [{"reader": "image_folder", "path": d, "test_fraction": 0.5, "name": d} for d in ("a", "b")]
    out = tmp_path / "bench"
    b2n = run_recipe(_recipe(method, "base_to_novel", ds[:1]), folders, out, backbone=bb, progress=False, log=lambda s: None)
    assert len(b2n) == 2 and all(0.0 <= r["base"] <= 1.0 and 0.0 <= r["novel"] <= 1.0 for r in b2n)
    mt = run_recipe(_recipe(method, "multi_task", ds), folders, out, backbone=bb, progress=False, log=lambda s: None)
    assert set(mt[0]["per_task"]) == {"a", "b"}
    if method == "mmap":  # the gradient-driven grouping decision is part of the result
        assert sorted(sum(mt[0]["grouping"]["groups"], [])) == ["a", "b"]
    report = write_report(out, commands=["clipheads bench protocol ..."])
    text = report.read_text()
    assert "Base-to-novel" in text and "Multi-task" in text and method in text
    assert (out / "base_to_novel.png").stat().st_size > 1000 and (out / "multi_task.png").exists()
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert method in summary["base_to_novel"] and method in summary["multi_task"]


def test_runner_resumes_without_rerunning_finished_units(folders, tmp_path):
    bb = make_backbone("test-vit-micro", seed=2)
    recipe = _recipe("coop", "few_shot", [{"reader": "image_folder", "path": "a", "test_fraction": 0.5, "name": "a"}])
    out = tmp_path / "bench"
    first = run_recipe(recipe, folders, out, backbone=bb, progress=False, log=lambda s: None)
    done = sorted((out / "runs" / recipe.name).glob("a_*.json"))
    assert len(done) == 2
    done[1].unlink()  # as if the run was killed before its second unit
    logs = []
    again = run_recipe(recipe, folders, out, backbone=bb, progress=False, log=logs.append)
    assert sum("done earlier" in line for line in logs) == 1
    assert again[0] == first[0]


def test_recipe_patterns_expand_to_packaged_names_and_unmatched_ones_fail_clearly():
    from clipheads.training.protocols.recipes import RecipeError, expand_recipe_refs

    names = expand_recipe_refs(["synth_*_multitask", "coop_few_shot"])
    assert names[-1] == "coop_few_shot"
    assert "synth_mmap_multitask" in names and all(n.endswith("_multitask") for n in names[:-1])
    with pytest.raises(RecipeError, match="no recipe 'nosuch_\\*'"):
        load_recipe(expand_recipe_refs(["nosuch_*"])[0])


def test_cli_pretrained_override_reaches_the_backbone(tmp_path, capsys):
    """`--pretrained PATH` alone replaces the recipe's weights (keeping its arch)."""
    from clipheads.training.protocols.cli import main

    missing = tmp_path / "nope.safetensors"
    assert main(["protocol", "synth_zeroshot_base2novel", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--pretrained", str(missing), "--quiet"]) == 2  # bad input: one line, no traceback
    assert "nope.safetensors" in capsys.readouterr().err


def test_cli_runs_recipes_in_parallel_processes_and_reports_with_the_command(tmp_path):
    """`--jobs 2`: two recipes in two spawned processes write one report; the command is kept for
    later re-renders (`clipheads bench report`)."""
    from clipheads.training.data import synth
    from clipheads.training.protocols.cli import main

    world = synth.generate_world(tmp_path / "w", seed=0, size=synth.WorldSize(train=2, val=1, test=1),
                                 image_size=48, workers=1)
    out = tmp_path / "o"
    argv = ["protocol", "synth_zeroshot_b*", "synth_zeroshot_heldout", "--data-root", str(world), "--out", str(out),
            "--pretrained", "none", "--seeds", "1", "--jobs", "2", "--quiet"]
    assert main(argv) == 0
    assert {p.parent.name for p in out.glob("runs/*/*.json") if p.name != "recipe.json"} == {
        "synth_zeroshot_base2novel", "synth_zeroshot_heldout"}
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "synth_zeroshot_b*" in (out / "report.md").read_text()


# ---- resume keyed on the effective configuration (issue 14.3) -------------------------------
def test_rerun_with_other_settings_is_refused_or_recomputed_never_reported_as_done(folders, tmp_path):
    from dataclasses import replace

    from clipheads.training.protocols.runner import StaleResultsError

    bb = make_backbone("test-vit-micro", seed=2)
    recipe = _recipe("coop", "few_shot", [{"reader": "image_folder", "path": "a", "test_fraction": 0.5, "name": "a"}])
    out = tmp_path / "bench"
    quiet = dict(backbone=bb, progress=False, log=lambda s: None)
    first = run_recipe(recipe, folders, out, **quiet)
    assert first[0]["config"]["train"]["epochs"] == 1 and first[0]["config"]["seed"] == 1
    # the same settings written explicitly (defaults filled in) are the same configuration
    same = replace(recipe, train={**recipe.train, "precision": "amp", "optimizer": "sgd"})
    assert run_recipe(same, folders, out, **quiet) == first
    longer = replace(recipe, train={**recipe.train, "epochs": 2})
    with pytest.raises(StaleResultsError, match=r"train\.epochs: 1 -> 2"):
        run_recipe(longer, folders, out, **quiet)
    # a run of seed 1 only still refuses: seed 2's stale file would reach the report
    with pytest.raises(StaleResultsError, match="2 result"):
        run_recipe(replace(longer, seeds=(1,)), folders, out, **quiet)
    logs = []
    again = run_recipe(longer, folders, out, backbone=bb, progress=False, log=logs.append, recompute=True)
    assert [r["config"]["train"]["epochs"] for r in again] == [2, 2] and not any("done earlier" in s for s in logs)
    assert len(list((out / "runs" / recipe.name / "stale").glob("*/*.json"))) == 2  # kept, not deleted
    other_data = tmp_path / "elsewhere"
    other_data.mkdir()
    (other_data / "a").symlink_to(folders / "a")
    with pytest.raises(StaleResultsError, match="data_root"):
        run_recipe(longer, other_data, out, **quiet)


def test_cli_refuses_stale_results_with_exit_2(tmp_path, capsys):
    from clipheads.training.data import synth
    from clipheads.training.protocols.cli import main

    world = synth.generate_world(tmp_path / "w", seed=0, size=synth.WorldSize(train=2, val=1, test=1),
                                 image_size=48, workers=1)
    common = ["protocol", "synth_coop_heldout", "--data-root", str(world), "--out", str(tmp_path / "o"),
              "--pretrained", "none", "--seeds", "1", "--quiet"]
    assert main(common + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(common + ["--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "--recompute" in err and len(err.strip().splitlines()) == 1
    assert main(common + ["--epochs", "2", "--recompute"]) == 0


def test_eval_split_val_scores_on_the_full_validation_split(folders, tmp_path):
    from dataclasses import replace

    from clipheads.training.data.readers import read_dataset
    from clipheads.training.loop import evaluate
    from clipheads.training.methods import TaskSpec, build_method

    bb = make_backbone("test-vit-micro", seed=2)
    ds = {"reader": "image_folder", "path": "a", "test_fraction": 0.4, "val_fraction": 0.4, "name": "a"}
    recipe = replace(_recipe("zeroshot", "few_shot", [ds]), seeds=(1,), eval_split="val")
    (res,) = run_recipe(recipe, folders, tmp_path / "o", backbone=bb, progress=False, log=lambda s: None)
    full = read_dataset("image_folder", str(folders / "a"), test_fraction=0.4, val_fraction=0.4)
    zs = build_method("zeroshot", bb, [TaskSpec("a", full.classnames, full.templates)])
    assert len(full.val) > 4 and res["top1"] == evaluate(zs, full.val)["top1"]
    assert res["config"]["eval_split"] == "val"


def test_zero_shot_transfer_uses_each_target_datasets_own_templates(tmp_path):
    """CoOp's zero-shot CLIP row: every target with its own template (DTD: "{} texture."), not the
    source's. The target here is the world's photo domain laid out as DTD."""
    import shutil

    from clipheads.training.backbone import load_backbone
    from clipheads.training.data import synth
    from clipheads.training.data.readers import read_dataset
    from clipheads.training.loop import evaluate
    from clipheads.training.methods import TaskSpec, build_method

    world = synth.generate_world(tmp_path / "w", seed=0, size=synth.WorldSize(train=1, val=0, test=2), workers=1)
    split = json.loads((world / "splits" / "photo.json").read_text())
    (tmp_path / "d" / "dtd").mkdir(parents=True)
    shutil.copytree(world / "photo", tmp_path / "d" / "dtd" / "images")
    (tmp_path / "d" / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    shutil.copytree(world, tmp_path / "d" / "world")
    recipe = Recipe.from_json({"name": "zs_xd", "method": "zeroshot", "protocol": "cross_dataset", "seeds": [1], "shots": [1],
                               "datasets": [{"reader": "synthetic", "path": "world", "domain": "sketch"},
                                            {"reader": "dtd", "path": ".", "role": "target"}]})
    bb = load_backbone()
    (res,) = run_recipe(recipe, tmp_path / "d", tmp_path / "o", backbone=bb, progress=False, log=lambda s: None)
    target = read_dataset("dtd", str(tmp_path / "d"))
    assert target.templates == ("{} texture.",)
    own = evaluate(build_method("zeroshot", bb, [TaskSpec("dtd", target.classnames, target.templates)]), target.test)["top1"]
    source = evaluate(build_method("zeroshot", bb, [TaskSpec("x", target.classnames, ("a photo of a {}.",))]), target.test)["top1"]
    assert own != source  # the template matters here, so the check below can fail
    assert res["targets"]["dtd"] == own


def test_official_fp16_precision_trains_in_half_and_restores_the_backbone(folders):
    import torch

    from clipheads.training.data.readers import read_dataset
    from clipheads.training.loop import TrainConfig, train_head
    from clipheads.training.methods import TaskSpec, build_method

    bb = make_backbone("test-vit-micro", seed=2)
    ds = read_dataset("image_folder", str(folders / "a"), test_fraction=0.5)
    head = build_method("coop", bb, [TaskSpec("a", ds.classnames, ds.templates)], {"n_ctx": 4})
    before = bb.parameters_checksum()
    seen = []
    orig = head.training_loss
    head.training_loss = lambda x, y, t: (seen.append((x.dtype, head.ctx.dtype)), orig(x, y, t))[1]
    res = train_head(head, {0: ds.train}, TrainConfig(**{**FAST_TRAIN, "precision": "fp16", "progress": False}))
    assert set(seen) == {(torch.float16, torch.float16)}  # images and prompts in half, as PREC: fp16
    assert head.ctx.dtype == torch.float32 and bb.parameters_checksum() == before
    assert res.history and res.final_loss == res.final_loss  # finite
    with pytest.raises(ValueError, match="precision must be one of"):
        train_head(head, {0: ds.train}, TrainConfig(precision="bf16", progress=False))


def _micro_weights(path: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in make_backbone("test-vit-micro", seed=seed).model.state_dict().items()},
              str(path))
    return path


def test_same_weights_path_with_other_weights_is_another_configuration(folders, tmp_path):
    """The resume key holds the weights' sha256, not only their path: a unit trained on one file is
    not reported as done after the file at that path changed (it was, before)."""
    from dataclasses import replace

    from clipheads.training.protocols.runner import StaleResultsError

    weights = _micro_weights(tmp_path / "micro.safetensors", seed=3)
    recipe = replace(_recipe("coop", "few_shot", [{"reader": "image_folder", "path": "a", "test_fraction": 0.5, "name": "a"}]),
                     seeds=(1,), backbone={"arch": "test-vit-micro", "pretrained": str(weights)})
    out = tmp_path / "bench"
    quiet = dict(progress=False, log=lambda s: None)
    first = run_recipe(recipe, folders, out, **quiet)
    logs = []
    assert run_recipe(recipe, folders, out, progress=False, log=logs.append) == first  # same file: resumed
    assert any("done earlier" in s for s in logs)
    _micro_weights(weights, seed=4)  # other weights, same path
    with pytest.raises(StaleResultsError, match="backbone.weights_sha256"):
        run_recipe(recipe, folders, out, **quiet)


def test_method_code_revision_and_regenerated_world_are_other_configurations(tmp_path, monkeypatch):
    """A results-changing fix inside a method (revisions.py) and a world regenerated at the same
    path with another seed make finished units stale; the same world reached from another checkout
    (same path relative to the working directory) resumes."""
    import shutil

    from clipheads.training.data import synth
    from clipheads.training.protocols import revisions
    from clipheads.training.protocols.cli import main

    size = synth.WorldSize(train=2, val=1, test=1)
    monkeypatch.chdir(tmp_path)
    synth.generate_world(tmp_path / "w", seed=0, size=size, image_size=48, workers=1)
    common = ["protocol", "synth_coop_heldout", "--data-root", "w", "--out", "o", "--pretrained", "none",
              "--seeds", "1", "--epochs", "1", "--quiet"]
    assert main(common) == 0
    # another checkout: a copy of the tree elsewhere, run from its own root, resumes
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copytree(tmp_path / "w", other / "w")
    (other / "o").symlink_to(tmp_path / "o")
    monkeypatch.chdir(other)
    logs = []
    monkeypatch.setattr("clipheads.training.console.info", lambda msg, quiet=False: logs.append(msg))
    assert main(common) == 0 and any("done earlier" in s for s in logs)
    monkeypatch.setitem(revisions.METHOD_REVISIONS, "coop", (2, "a fix that changes results"))
    assert main(common) == 2
    assert main(common + ["--recompute"]) == 0
    monkeypatch.chdir(tmp_path)
    synth.generate_world(tmp_path / "w", seed=1, size=size, image_size=48, workers=1)  # same path, other world
    assert main(common) == 2


def test_a_units_result_depends_on_its_seed_not_on_the_units_run_before_it(folders, tmp_path):
    """Seed 2 run alone (as after a resume) equals seed 2 run after seed 1 in the same process:
    the head's init is drawn from the unit's seed (it was drawn from the RNG state the previous
    unit left)."""
    from dataclasses import replace

    bb = make_backbone("test-vit-micro", seed=2)
    recipe = _recipe("maple", "few_shot", [{"reader": "image_folder", "path": "a", "test_fraction": 0.5, "name": "a"}])
    both = run_recipe(recipe, folders, tmp_path / "both", backbone=bb, progress=False, log=lambda s: None)
    alone = run_recipe(replace(recipe, seeds=(2,)), folders, tmp_path / "alone", backbone=bb, progress=False,
                       log=lambda s: None)
    assert both[1]["seed"] == alone[0]["seed"] == 2
    assert both[1]["first_loss"] == alone[0]["first_loss"] and both[1]["final_loss"] == alone[0]["final_loss"]
