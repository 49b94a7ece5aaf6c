"""`clipheads train` / `eval` runs as a user makes them: one seed gives one head, MmAP groups its
tasks, fp16 VPT finishes, a bad --out fails before training and a failed evaluation keeps the
head, odd CSV labels and unreadable images get clear errors, and eval never scores a multi-task
head's data with the wrong task's prompts (training/fit.py, loop.py, data/)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import _register_test_configs
from test_foundation import make_colour_folder
from clipheads.training.artifact import ArtifactError, load_head
from clipheads.training.cli import main
from clipheads.training.fit import EvaluationRefused, evaluate, train

FAST = dict(epochs=1, batch_size=4, progress=False, recipe=None)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("data") / "colours", per_class=4)


def test_one_seed_gives_one_head(micro_backbone, colours):
    """The random init of a head belongs to the run: two runs with one seed (in one process, so the
    global RNG has moved on between them) write identical tensors."""
    heads = [train("vpt", colours, backbone=micro_backbone, seed=3, evaluate=False, **FAST) for _ in range(2)]
    other = train("vpt", colours, backbone=micro_backbone, seed=4, evaluate=False, **FAST)
    (a, b), c = [h.state_dict() for h in heads], other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_mmap_training_decides_its_task_groups(micro_backbone, colours, tmp_path):
    """`train("mmap", several tasks)` runs the gradient-driven grouping (not every task in group
    0): the report is in the record and the head's tasks carry its groups."""
    said: list[str] = []
    head = train("mmap", {"a": colours, "b": colours, "c": colours}, backbone=micro_backbone, evaluate=False,
                 config={"grouping_steps": 2}, log=said.append, out=tmp_path / "m.head.safetensors", **FAST)
    report = head.training_record["grouping"]
    assert sorted(n for g in report["groups"] for n in g) == ["a", "b", "c"] and report["steps"] == 2
    group_of = {n: gi for gi, g in enumerate(report["groups"]) for n in g}
    assert [t.group for t in head.tasks] == [group_of[t.name] for t in head.tasks]
    assert [t.group for t in load_head(tmp_path / "m.head.safetensors").tasks] == [t.group for t in head.tasks]
    assert any(line.startswith("task groups") for line in said)
    one = train("mmap", {"a": colours, "b": colours}, backbone=micro_backbone, evaluate=False,
                config={"n_groups": 1}, **FAST)
    assert "grouping" not in one.training_record  # one group asked for: nothing to decide


def test_fp16_vpt_trains_and_evaluates(micro_backbone, colours):
    """Class weights computed under fp16 training are not reused by the fp32 evaluation after it."""
    head = train("vpt", colours, backbone=micro_backbone, test_fraction=0.25, precision="fp16", **FAST)
    assert 0.0 <= head.training_record["metrics"]["test_top1"]["colours"] <= 1.0


def test_a_bad_out_fails_before_training_and_a_failed_evaluation_keeps_the_head(micro_backbone, colours, tmp_path,
                                                                                 monkeypatch):
    said: list[str] = []
    with pytest.raises(ArtifactError, match="NAME.head.safetensors"):
        train("coop", colours, backbone="test-vit-micro", pretrained="none", out=tmp_path / "x.safetensors",
              log=said.append, **FAST)
    assert said == []  # refused before the backbone was even loaded
    (tmp_path / "taken.head.safetensors").mkdir()
    with pytest.raises(ArtifactError, match="is a folder"):
        train("coop", colours, backbone=micro_backbone, out=tmp_path / "taken.head.safetensors", **FAST)

    import clipheads.training.loop as loop

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop, "evaluate", broken)
    out = tmp_path / "kept.head.safetensors"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train("coop", colours, backbone=micro_backbone, test_fraction=0.25, out=out, **FAST)
    assert load_head(out).training["trainable_parameters"] > 0  # the trained head survived


def test_csv_numbers_that_are_not_indices_are_class_names(colours, tmp_path):
    """Labels 707 and 747 without a classnames.txt are two classes named '707' and '747', not 748
    classes (most of them empty); 0..n-1 stay indices."""
    from clipheads.training.data.readers import read_csv_tasks

    imgs = sorted(colours.glob("*/*.png"))
    rows = [f"{p.relative_to(tmp_path.parent)},{747 if p.parent.name == 'red' else 707}" for p in imgs]
    csv = tmp_path.parent / "planes.csv"
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    (ds,) = read_csv_tasks(csv).values()
    assert ds.classnames == ("707", "747")
    assert {s.classname for s in ds.train if "red" in s.path} == {"747"}
    csv.write_text("path,label\n" + "\n".join(f"{p.relative_to(tmp_path.parent)},{i % 2}" for i, p in enumerate(imgs)))
    assert next(iter(read_csv_tasks(csv).values())).classnames == ("0", "1")


def test_bad_training_data_is_a_one_line_error(tmp_path, capsys):
    _register_test_configs()
    data = make_colour_folder(tmp_path / "img", per_class=2)
    bad = data / "red" / "cut.png"
    bad.write_bytes((data / "red" / "0.png").read_bytes()[:60])
    base = ["--backbone", "test-vit-micro", "--pretrained", "none", "--epochs", "1", "-q"]
    assert main(["train", "--method", "coop", "--data", str(data), "--out", str(tmp_path / "a.head.safetensors"),
                 *base]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot read this image" in err and "Traceback" not in err
    bad.unlink()
    assert main(["train", "--method", "coop", "--data", str(data), "--classes", "extra=cat,dog",
                 "--out", str(tmp_path / "b.head.safetensors"), *base]) == 2
    err = capsys.readouterr().err
    assert "extra have no training images" in err and "Traceback" not in err
    assert main(["eval", str(tmp_path / "none.head.safetensors"), "--data", f"dtd:{tmp_path}:foo", "-q"]) == 2


def test_eval_of_a_multi_task_head_needs_the_task_named(micro_backbone, colours, tmp_path):
    head = train("coop", {"a": colours, "b": colours}, backbone=micro_backbone, test_fraction=0.25, **FAST)
    copy = shutil.copytree(colours, tmp_path / "copy")
    with pytest.raises(EvaluationRefused, match="not a task of this head.*--task TASK=SPEC"):
        evaluate(head, copy)
    assert set(evaluate(head, {"b": copy})) == {"b"}


def test_eval_cannot_be_tricked_by_a_relative_image_root_or_a_moved_dataset(micro_backbone, colours, tmp_path,
                                                                            monkeypatch):
    """A split_json spec's image root is recorded absolute, so eval from another folder still
    knows the training images; data whose recorded source no longer reads is flagged."""
    rows = [[f"{p.parent.name}/{p.name}", i, p.parent.name] for i, c in enumerate(sorted(d.name for d in colours.iterdir()))
            for p in sorted((colours / c).iterdir())]
    split = tmp_path / "train_only.json"
    split.write_text(json.dumps({"train": rows}))
    monkeypatch.chdir(colours.parent)
    head = train("coop", f"split_json:{split}:{colours.name}", backbone=micro_backbone, test_fraction=0.25, **FAST)
    monkeypatch.chdir(tmp_path)
    (res,) = evaluate(head, f"split_json:{split}:{colours}").values()
    assert res["split"] == "test" and res["carved"] and res["n"] == sum(len(r) for r in [rows]) // 4
    assert head.training_record["data"]["split_json"] == f"split_json:{split}:{colours}"

    moved = shutil.copytree(colours, tmp_path / "moved")
    h2 = train("coop", moved, backbone=micro_backbone, test_fraction=0.25, **FAST)
    moved.rename(tmp_path / "moved-again")
    (res,) = evaluate(h2, tmp_path / "moved-again").values()
    assert res["training_data_unreadable"] == [str(moved)]
    from clipheads.training.fit import describe_results

    assert "cannot be recognised" in describe_results({"x": res})
