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
    with pytest.raises(Exception, match="nope.safetensors"):
        main(["protocol", "synth_zeroshot_base2novel", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
              "--pretrained", str(missing), "--quiet"])


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
