"""`clipheads export --rename OLD=NEW` (issue 15.4): two heads trained on the same data both call
their task after the data's stem; renaming lets them share one bundle."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from clipheads.export.bundle import load_bundle  # noqa: E402
from clipheads.export.cli import main  # noqa: E402
from clipheads.training.artifact import load_head, save_head  # noqa: E402
from clipheads.training.methods import TaskSpec, build_method  # noqa: E402

PETS = TaskSpec("pets", ("cat", "dog", "bird"))


def _two_heads(backbone, tmp_path):
    a = save_head(build_method("coop", backbone, (PETS,), {"n_ctx": 2}), tmp_path / "a.head.safetensors")
    b = save_head(build_method("zeroshot", backbone, (PETS,)), tmp_path / "b.head.safetensors")
    return str(a), str(b)


def test_rename_lets_two_heads_with_one_task_name_share_a_bundle(micro_backbone, tmp_path, capsys):
    a, b = _two_heads(micro_backbone, tmp_path)
    out = tmp_path / "bundle"
    assert main([a, b, "--out", str(out), "--probes", "4", "--no-text"]) == 2
    assert "unique" in capsys.readouterr().err and not out.exists()
    assert main([a, b, "--out", str(out), "--probes", "4", "--no-text", "--rename", "pets=x"]) == 2
    assert "say which" in capsys.readouterr().err  # ambiguous: both heads have 'pets'
    assert main([a, b, "--out", str(out), "--probes", "4", "--no-text", "--rename", "2:pets=pets_zs", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["tasks"] == ["pets", "pets_zs"]
    m = load_bundle(out).manifest
    assert [t["name"] for t in m["tasks"]] == ["pets", "pets_zs"]
    assert m["heads"][1]["renamed"] == {"pets": "pets_zs"} and "renamed" not in m["heads"][0]
    assert [t.name for t in load_head(b).tasks] == ["pets"]  # the head file is untouched


def test_rename_of_an_unknown_task_is_bad_input(micro_backbone, tmp_path, capsys):
    a, _ = _two_heads(micro_backbone, tmp_path)
    assert main([a, "--out", str(tmp_path / "o"), "--rename", "cars=autos", "-q"]) == 2
    err = capsys.readouterr().err
    assert "no such task" in err and "1:pets" in err and len(err.strip().splitlines()) == 1


def test_renames_apply_at_once_so_two_tasks_can_swap(micro_backbone, tmp_path):
    """`--rename a=b --rename b=a` swaps two tasks of one head (each OLD names a task as the head
    came, not as an earlier rename left it)."""
    from clipheads.export.heads import rename_tasks

    head = build_method("coop", micro_backbone, (PETS, TaskSpec("cars", ("sedan", "truck"))), {"n_ctx": 2})
    done = rename_tasks([head], [str(tmp_path / "h.head.safetensors")], {"1:pets": "cars", "1:cars": "pets"})
    assert [(t.name, t.classnames) for t in head.tasks] == [("cars", PETS.classnames), ("pets", ("sedan", "truck"))]
    assert done == [{"head": 1, "from": "pets", "to": "cars"}, {"head": 1, "from": "cars", "to": "pets"}]
