"""Issue 14.3: recipes express the official configurations (per-dataset / per-shot overrides), the
recipe-vs-official table cannot drift, and `clipheads bench list` shows it."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from clipheads.training.protocols import fidelity
from clipheads.training.protocols.recipes import DatasetRef, Recipe, RecipeError, list_recipes, load_recipe


def test_every_packaged_recipe_matches_its_official_config_or_says_why():
    problems = [p for name in list_recipes() for p in fidelity.check_recipe(load_recipe(name))]
    assert problems == []


def test_every_mirrored_config_was_extracted_from_a_recorded_commit():
    spec, got = fidelity.mirrors(), fidelity.official_configs()
    assert set(got["configs"]) == set(spec["configs"])
    for entry in spec["recipes"].values():
        assert {m["config"] for m in entry["mirrors"]} <= set(got["configs"])
    assert all("@" in v and len(v.split("@")[1]) == 40 for v in got["repos"].values())
    for cid, c in got["configs"].items():
        assert c["source"].startswith(got["repos"][spec["configs"][cid]["repo"]][:-33])  # repo@short-commit:file


def test_a_drifting_recipe_fails_the_check():
    maple = load_recipe("maple_base2novel")
    drifted = replace(maple, train={**maple.train, "lr": 0.01})
    (problem,) = fidelity.check_recipe(drifted)
    assert "train.lr differs" in problem and "0.01" in problem and "0.0035" in problem
    # a reason for something that no longer differs is stale too
    fp16 = replace(maple, train={**maple.train, "precision": "fp16"})
    assert fidelity.check_recipe(fp16) == [
        "maple_base2novel: mirrors.json gives a reason for train.precision, which no longer differs"]
    # per-dataset drift is caught on that dataset only
    mma = load_recipe("mma_base2novel")
    no_override = replace(mma, overrides=())
    (problem,) = fidelity.check_recipe(no_override)
    assert "train.batch_size" in problem and "imagenet" in problem


def test_official_schedules_by_shots_and_dataset():
    """CoOp's epochs by K (50 / 100 / 200) and ImageNet's ep50; MMA's ImageNet batch 128; CoOp in
    cross-dataset is the CoCoOp paper's CoOp; COMMA compared with released numbers runs its mode."""
    coop = load_recipe("coop_few_shot")
    imagenet, pets = (next(r for r in coop.datasets if r.reader == n) for n in ("imagenet", "oxford_pets"))
    assert [coop.settings(pets, k)[1]["epochs"] for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert {coop.settings(imagenet, k)[1]["epochs"] for k in (1, 2, 4, 8, 16)} == {50}
    b2n = load_recipe("coop_base2novel")
    assert b2n.settings(imagenet, 16)[1]["epochs"] == 50 and b2n.settings(pets, 16)[1]["epochs"] == 200
    mma = load_recipe("mma_base2novel")
    assert mma.settings(imagenet, 16)[1]["batch_size"] == 128 and mma.settings(pets, 16)[1]["batch_size"] == 16
    for name in ("coop_cross_dataset", "coop_domain_generalization"):
        assert load_recipe(name).settings(imagenet, 16)[0] == {"n_ctx": 4, "ctx_init": "a photo of a"}
    assert load_recipe("comma_base2novel").method_config["detach_generator"] is True
    assert "detach_generator" not in load_recipe("comma_base2novel_paper").method_config
    assert all(load_recipe(n).train.get("precision") for n in list_recipes() if load_recipe(n).method != "zeroshot")


def test_overrides_apply_in_order_and_bad_ones_are_refused():
    r = Recipe.from_json({"name": "x", "method": "coop", "protocol": "few_shot", "datasets": [{"reader": "dtd"}],
                          "train": {"epochs": 10}, "overrides": [
                              {"when": {"shots": [1, 2]}, "train": {"epochs": 3}},
                              {"when": {"dataset": "dtd", "shots": 2}, "train": {"epochs": 4}, "method_config": {"n_ctx": 2}}]})
    dtd, pets = DatasetRef("dtd"), DatasetRef("oxford_pets")
    assert [r.settings(dtd, k)[1]["epochs"] for k in (1, 2, 4)] == [3, 4, 10]
    assert r.settings(pets, 2) == ({}, {"epochs": 3})
    assert r.settings(dtd, 2)[0] == {"n_ctx": 2}
    assert Recipe.from_json(r.to_json()) == r  # round trip
    with pytest.raises(RecipeError, match="an override is"):
        Recipe.from_json({**r.to_json(), "overrides": [{"when": {"epoch": 1}, "train": {"lr": 1}}]})
    with pytest.raises(RecipeError, match="eval_split"):
        Recipe.from_json({**r.to_json(), "eval_split": "train"})


def test_bench_list_json_shows_the_mirrored_config_and_every_difference(capsys):
    from clipheads.training.protocols.cli import main

    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["recipes"]}
    assert set(rows) == set(list_recipes())
    comma = rows["comma_cross_dataset"]
    assert comma["mirrors"][0]["source"].startswith("hulianyuyy/COMMA@3584f31:configs/trainers/COMMA/")
    assert set(comma["differences"]) == {"train.precision", "method.detach_generator"}
    assert comma["differences"]["train.precision"][0] == {"ours": "amp", "official": "fp16", "conditions": ["imagenet K=16"]}
    assert comma["reasons"]["method.detach_generator"]
    assert rows["mma_base2novel"]["differences"] == {} and rows["mma_base2novel"]["precision"] == "amp"
    assert not rows["synth_mmap_multitask"]["official"] and rows["synth_mmap_multitask"]["note"]
    assert main(["list", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "`CoOp/vit_b16_ep50.yaml`, `CoOp/vit_b16_ep100.yaml`, `CoOp/vit_b16.yaml`" in table and "KaiyangZhou/CoOp@ff61507" in table


def test_readme_shows_the_current_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipes = [load_recipe(n) for n in list_recipes() if not n.startswith("synth_")]
    assert fidelity.render_fidelity_markdown(recipes) in readme, "README: paste `clipheads bench list --markdown`"
