"""Data specs name tasks as users expect, and a manifest cannot put one image on both sides of a
split: `--data .`, `--task` name clashes, duplicate CSV rows, odd digit labels, multi-task CSV heads
whose training images `eval` rebuilds (training/data/sources.py, readers/generic.py, fit.py)."""
from __future__ import annotations

import shutil

import pytest

from conftest import _register_test_configs
from test_foundation import make_colour_folder
from clipheads.training.cli import main
from clipheads.training.data.readers import DatasetLayoutError
from clipheads.training.data.sources import DataSpecError, resolve_tasks


def _csv(tmp_path, rows: list[str], name: str = "m.csv"):
    data = make_colour_folder(tmp_path / "img", per_class=2)
    path = tmp_path / name
    path.write_text("path,label,split,task\n" + "".join(r + "\n" for r in rows))
    return data, path


def test_a_folder_given_as_dot_is_named_after_itself(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "colours", per_class=1)
    monkeypatch.chdir(data)
    assert list(resolve_tasks(["."])) == ["colours"]
    assert list(resolve_tasks([str(data / "red" / "..")])) == ["colours"]


def test_a_task_name_the_user_gave_is_never_renamed(tmp_path):
    a, b = make_colour_folder(tmp_path / "a", per_class=1), make_colour_folder(tmp_path / "b", per_class=1)
    with pytest.raises(DataSpecError, match="already given"):
        resolve_tasks([], [f"x={a}", f"x={b}"])
    with pytest.raises(DataSpecError, match="already given"):
        resolve_tasks([str(a)], [f"a={b}"])
    assert list(resolve_tasks([str(a), str(b / ".." / "a")])) == ["a", "a-2"]  # derived names still get a suffix


@pytest.mark.parametrize("rows, says", [
    (["img/red/0.png,red,train,", "img/red/0.png,red,test,"], "again (as train there, test here)"),
    (["img/red/0.png,red,train,", "img/red/1.png,red,train,", "img/red/0.png,red,train,"], "line 4 lists the image of line 2"),
    (["img/red/0.png,red,train,", "./img//red/0.png,blue,train,"], "again"),  # one file, two spellings
])
def test_an_image_listed_twice_in_a_task_is_refused(tmp_path, rows, says):
    _, path = _csv(tmp_path, rows)
    with pytest.raises(DatasetLayoutError, match=r"list each image once") as err:
        resolve_tasks([str(path)])
    assert says in str(err.value)


def test_one_image_in_two_tasks_is_fine_and_odd_digits_are_names(tmp_path):
    _, path = _csv(tmp_path, ["img/red/0.png,red,train,a", "img/red/0.png,warm,train,b", "img/red/1.png,²,train,b"])
    tasks = resolve_tasks([str(path)])
    assert set(tasks) == {"a", "b"} and tasks["b"].classnames == ("warm", "²")  # '²' is a name, not int('²')


def test_eval_rebuilds_the_training_images_of_a_multi_task_csv_head(tmp_path, capsys):
    _register_test_configs()
    data = make_colour_folder(tmp_path / "img", per_class=4)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name},,{task}" for task in ("a", "b") for p in sorted(data.glob("*/*.png"))]
    (tmp_path / "multi.csv").write_text("path,label,split,task\n" + "\n".join(rows) + "\n")
    head = tmp_path / "multi.head.safetensors"
    assert main(["train", "--method", "coop", "--data", str(tmp_path / "multi.csv"), "--test-fraction", "0.5",
                 "--epochs", "1", "--backbone", "test-vit-micro", "--pretrained", "none", "--out", str(head), "-q"]) == 0
    from clipheads.training.artifact import load_head
    from clipheads.training.fit import training_images

    record = load_head(head).training
    assert len(training_images(record)) == 3 * 2  # half of each class's 4 images, the same files in both tasks
    capsys.readouterr()
    assert main(["eval", str(head), "--data", str(tmp_path / "multi.csv"), "--test-fraction", "0.5",
                 "--split-seed", "7", "-q"]) == 2
    assert "are images this head trained on" in capsys.readouterr().err
    shutil.rmtree(data / "red")  # data changed since: the rebuild skips what no longer reads, no crash
    assert training_images(record) == set()  # a listing that no longer reads rebuilds nothing


def test_a_split_json_reader_spec_names_its_image_root(tmp_path):
    """`split_json:FILE.json:IMAGES` reads the images below IMAGES (the third field is that
    reader's image root, not a domain); without it they are looked for beside the file."""
    import json

    data = make_colour_folder(tmp_path / "photos", per_class=2)
    rows = [[f"{c}/{f.name}", i, c] for i, c in enumerate(sorted(p.name for p in data.iterdir()))
            for f in sorted((data / c).iterdir())]
    split = tmp_path / "splits" / "colours.json"
    split.parent.mkdir()
    split.write_text(json.dumps({"train": rows[::2], "val": [], "test": rows[1::2]}))
    (name, ds), = resolve_tasks([f"split_json:{split}:{data}"]).items()
    assert name == "split_json" and len(ds.train) == len(rows[::2]) and len(ds.test) == len(rows[1::2])
    assert all(s.path.startswith(str(data)) for s in ds.train + ds.test)
    assert ds.meta["image_root"] == str(data)
    (beside,) = resolve_tasks([f"split_json:{split}"]).values()
    assert all(s.path.startswith(str(split.parent)) for s in beside.train)


def test_classes_the_text_encoder_reads_alike_are_reported(tmp_path, capsys):
    """'Red' and 'red' folders are two classes with one prompt: training says so (not refused:
    some benchmarks' class lists hold such pairs)."""
    data = make_colour_folder(tmp_path / "img", per_class=1)
    (data / "red").rename(data / "Red_")
    (data / "green").rename(data / "red")
    assert main(["train", "--method", "zeroshot", "--data", str(data), "--out", str(tmp_path / "z.head.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "1 class pair(s) read the same to the text encoder" in err and "'Red' ~ 'red'" in err, err
