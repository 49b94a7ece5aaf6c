"""Dataset readers on miniature trees in each layout: counts, labels, class names, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest_data import make_synthetic_world, wnids, write_classnames, write_image, write_images, write_split_zhou
from clipheads.training.data import readers as R
from clipheads.training.data.readers import DatasetLayoutError
from clipheads.training.data.readers.coop import SPLIT_JSON_DATASETS, SplitJsonDataset
from clipheads.training.data.templates import templates_for

COOP_READERS = {
    "oxford_pets", "caltech101", "stanford_cars", "oxford_flowers", "food101", "sun397", "dtd", "eurosat",
    "ucf101", "fgvc_aircraft", "imagenet",
}
ALL_READERS = COOP_READERS | {
    "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "office_home", "mini_domainnet", "synthetic",
    "image_folder", "split_json", "csv",
}


def _labels_consistent(ds) -> None:
    for s in (*ds.train, *ds.val, *ds.test):
        assert 0 <= s.label < ds.num_classes and ds.classnames[s.label] == s.classname
        assert os.path.isabs(s.path)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_reader():
    assert ALL_READERS <= set(R.list_readers())
    assert R.list_readers() == sorted(R.list_readers())


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        R.register_reader("oxford_pets")(lambda root: None)


def test_unknown_reader_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset reader 'pets'.*oxford_pets"):
        R.read_dataset("pets", "/nowhere")


def test_unknown_option_is_named(tmp_path):
    with pytest.raises(ValueError, match="takes no option \\['domain'\\]"):
        R.read_dataset("oxford_pets", tmp_path, domain="art")


# ----------------------------------------------------------------------------- ImageFolder


def _folder_tree(root: Path, per_class: dict[str, int]) -> Path:
    for cname, n in per_class.items():
        write_images(root / cname, n, ext="png")
    return root


def test_image_folder_sorted_classes_and_cleaned_names(tmp_path):
    root = _folder_tree(tmp_path / "pets", {"tabby_cat": 3, "Beagle": 2, "alpaca": 4})
    (root / "alpaca" / "notes.txt").write_text("not an image")
    write_image(root / "alpaca" / "nested" / "deep.jpeg")
    ds = R.read_image_folder(root)
    assert ds.name == "pets"
    assert ds.classnames == ("Beagle", "alpaca", "tabby cat")  # sorted folder names, `_` -> space
    assert [sum(s.label == y for s in ds.train) for y in range(3)] == [2, 5, 3]
    assert ds.val == ds.test == ()
    _labels_consistent(ds)


def test_image_folder_fraction_split_is_deterministic_per_seed(tmp_path):
    root = _folder_tree(tmp_path / "d", {f"c{i}": 10 for i in range(4)})
    a = R.read_image_folder(root, val_fraction=0.2, test_fraction=0.2, seed=1)
    b = R.read_image_folder(root, val_fraction=0.2, test_fraction=0.2, seed=1)
    c = R.read_image_folder(root, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert (len(a.train), len(a.val), len(a.test)) == (24, 8, 8)
    assert a == b and a.test != c.test
    paths = [s.path for s in (*a.train, *a.val, *a.test)]
    assert len(paths) == len(set(paths)) == 40


def test_image_folder_keeps_a_training_image_per_tiny_class(tmp_path):
    root = _folder_tree(tmp_path / "d", {"one": 1, "two": 2})
    ds = R.read_image_folder(root, val_fraction=0.3, test_fraction=0.3)
    assert {s.label for s in ds.train} == {0, 1}


def test_image_folder_presplit_layout(tmp_path):
    root = tmp_path / "d"
    _folder_tree(root / "train", {"a": 2, "b": 2})
    _folder_tree(root / "test", {"b": 3})
    ds = R.read_image_folder(root)
    assert ds.classnames == ("a", "b") and len(ds.train) == 4 and len(ds.test) == 3
    assert {s.label for s in ds.test} == {1}


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not a directory.*<root>/<class>/"):
        R.read_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        R.read_image_folder(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(DatasetLayoutError, match="without images.*empty_class"):
        R.read_image_folder(tmp_path / "flat")


# ----------------------------------------------------------------------------- split_zhou JSON


def test_split_json_file(tmp_path):
    write_split_zhou(tmp_path / "s.json", tmp_path / "imgs", ["golden_retriever", "cat"], (3, 1, 2))
    ds = R.read_split_zhou(tmp_path / "s.json", tmp_path / "imgs")
    assert ds.name == "s" and ds.classnames == ("golden retriever", "cat")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.train[0].path == str(tmp_path / "imgs" / "golden_retriever" / "train_0.jpg")
    _labels_consistent(ds)
    text = (tmp_path / "s.json").read_text(encoding="utf-8")
    (tmp_path / "bom.json").write_text("\ufeff" + text, encoding="utf-8")  # what Windows editors save
    assert R.read_split_zhou(tmp_path / "bom.json", tmp_path / "imgs").train == ds.train
    (tmp_path / "latin1.json").write_bytes(text.replace("cat", "caf\xe9").encode("latin-1"))
    with pytest.raises(DatasetLayoutError, match="not a readable split_zhou JSON"):
        R.read_split_zhou(tmp_path / "latin1.json", tmp_path / "imgs")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["../outside.jpg", 0, "a"]], "escapes"),
        ([["/etc/passwd", 0, "a"]], "absolute path"),
        ([["a.jpg", "0", "a"]], "expected \\[relative_path, int label, classname\\]"),
        ([["a.jpg", 0, "a"], ["b.jpg", 2, "c"]], "without gaps"),
        ([["a.jpg", 0, "a"], ["b.jpg", 0, "b"]], "two class names"),
    ],
)
def test_split_json_rejects_bad_rows(tmp_path, rows, message):
    (tmp_path / "s.json").write_text(json.dumps({"train": rows, "val": [], "test": []}))
    with pytest.raises(DatasetLayoutError, match=message):
        R.read_split_zhou(tmp_path / "s.json")


def test_split_json_needs_the_three_keys(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetLayoutError, match="keys 'train', 'val', 'test'"):
        R.read_split_zhou(tmp_path / "s.json")


# ----------------------------------------------------------------------------- CSV manifests


def _csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_class_names(tmp_path):
    for i in range(4):
        write_image(tmp_path / "m" / "img" / f"{i}.png")
    csv_path = _csv(tmp_path / "m" / "data.csv", [
        "path,label,split",
        "img/0.png,zebra,train", "img/1.png,aardvark,train", "img/2.png,zebra,test", "./img/3.png,sea_lion,val",
    ])
    ds = R.read_csv(csv_path)
    assert ds.name == "data" and ds.classnames == ("aardvark", "sea lion", "zebra")
    assert [s.label for s in ds.train] == [2, 0] and [s.label for s in ds.test] == [2] and ds.val[0].label == 1
    assert ds.train[0].path == str(tmp_path / "m" / "img" / "0.png")
    _labels_consistent(ds)


def test_csv_with_int_labels_and_classnames_file(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.jpg")
    _csv(tmp_path / "classnames.txt", ["dog", "cat", "hot_dog"])
    ds = R.read_csv(_csv(tmp_path / "m.csv", ["path,label", "0.jpg,2", "1.jpg,0", "2.jpg,2"]))
    assert ds.classnames == ("dog", "cat", "hot dog") and [s.label for s in ds.train] == [2, 0, 2]


def test_csv_with_int_labels_without_names(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"{i}.jpg")
    ds = R.read_csv(_csv(tmp_path / "m.csv", ["PATH,Label", "0.jpg,0", "1.jpg,1"]))
    assert ds.classnames == ("0", "1") and [s.label for s in ds.train] == [0, 1]
    # numbers with gaps are names (no empty classes "1", "2"); classnames.txt makes them indices
    ds = R.read_csv(_csv(tmp_path / "m.csv", ["PATH,Label", "0.jpg,0", "1.jpg,3"]))
    assert ds.classnames == ("0", "3") and [s.label for s in ds.train] == [0, 1]


def test_csv_task_column_makes_one_dataset_per_task(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png")
    csv_path = _csv(tmp_path / "mt.csv", ["path,label,task", "0.png,cat,sketch", "1.png,dog,photo", "2.png,dog,sketch", "3.png,bird,photo"])
    tasks = R.read_csv_tasks(csv_path)
    assert list(tasks) == ["sketch", "photo"]
    assert tasks["sketch"].classnames == ("cat", "dog") and tasks["photo"].classnames == ("bird", "dog")
    with pytest.raises(DatasetLayoutError, match="holds 2 tasks"):
        R.read_csv(csv_path)


@pytest.mark.parametrize("bad_path, message", [
    ("/etc/passwd", "absolute path"),
    ("../secret.png", "escapes"),
    ("img/../../secret.png", "escapes"),
    ("C:/Windows/x.png", "absolute path"),
])
def test_csv_rejects_paths_outside_its_folder(tmp_path, bad_path, message):
    write_image(tmp_path / "secret.png")
    write_image(tmp_path / "m" / "img" / "ok.png")
    csv_path = _csv(tmp_path / "m" / "data.csv", ["path,label", "img/ok.png,a", f"{bad_path},b"])
    with pytest.raises(DatasetLayoutError, match=f"data.csv:3: .*{message}"):
        R.read_csv(csv_path)


def test_csv_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="header .* lacks path/label"):
        R.read_csv(_csv(tmp_path / "a.csv", ["file,class", "x.png,a"]))
    with pytest.raises(DatasetLayoutError, match="1 image\\(s\\) not found \\(line 2"):
        R.read_csv(_csv(tmp_path / "b.csv", ["path,label", "missing.png,a"]))
    write_image(tmp_path / "x.png")
    with pytest.raises(DatasetLayoutError, match="split 'dev'"):
        R.read_csv(_csv(tmp_path / "c.csv", ["path,label,split", "x.png,a,dev"]))
    with pytest.raises(DatasetLayoutError, match="no rows"):
        R.read_csv(_csv(tmp_path / "d.csv", ["path,label"]))


# ----------------------------------------------------------------------------- the CoOp split_zhou datasets


def _make_coop(root: Path, spec: SplitJsonDataset, classes: list[str]) -> None:
    ddir = root / spec.folder
    write_split_zhou(ddir / spec.split_file, ddir / spec.image_dir, classes, (3, 1, 2))


RAW_AND_CLEAN = {
    "oxford_pets": (["abyssinian", "american_bulldog", "yorkshire_terrier"], ("abyssinian", "american bulldog", "yorkshire terrier")),
    "caltech101": (["airplanes", "Faces", "Leopards", "accordion"], ("airplane", "face", "leopard", "accordion")),
    "eurosat": (["AnnualCrop", "Forest", "Highway or Road", "SeaLake"], ("Annual Crop Land", "Forest", "Highway or Road", "Sea or Lake")),
    "ucf101": (["Apply_Eye_Makeup", "Basketball"], ("Apply Eye Makeup", "Basketball")),
    "food101": (["apple_pie", "baby_back_ribs"], ("apple pie", "baby back ribs")),
}


@pytest.mark.parametrize("spec", SPLIT_JSON_DATASETS, ids=lambda s: s.reader)
def test_coop_split_json_datasets(tmp_path, spec):
    raw, clean = RAW_AND_CLEAN.get(spec.reader, (["class_a", "class b", "c"], ("class a", "class b", "c")))
    _make_coop(tmp_path, spec, raw)
    ds = R.read_dataset(spec.reader, tmp_path)
    assert ds.name == spec.dassl_name and ds.classnames == clean
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3 * len(raw), len(raw), 2 * len(raw))
    assert ds.templates == templates_for(spec.dassl_name)
    assert all(Path(s.path).is_file() for s in ds.train)  # joined to the right image dir
    _labels_consistent(ds)
    # The dataset folder itself also works as root.
    assert R.read_dataset(spec.reader, tmp_path / spec.folder) == ds


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    spec = next(s for s in SPLIT_JSON_DATASETS if s.reader == "stanford_cars")
    _make_coop(tmp_path, spec, ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"])
    ds = R.read_dataset("stanford_cars", tmp_path)
    assert ds.train[0].path.startswith(str(tmp_path / "stanford_cars") + os.sep)
    assert ds.templates == ("a photo of a {}.",)


def test_wrong_root_names_the_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        R.read_dataset("oxford_pets", tmp_path)
    msg = str(err.value)
    assert "expected <root>/oxford_pets/images and <root>/oxford_pets/split_zhou_OxfordPets.json" in msg
    assert str(tmp_path) in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(DatasetLayoutError, match="root does not exist"):
        R.read_dataset("dtd", tmp_path / "nope")


# ----------------------------------------------------------------------------- FGVCAircraft


def test_fgvc_aircraft(tmp_path):
    ddir = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F-16A/B"]
    (ddir).mkdir()
    (ddir / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"train": ["1000001 F-16A/B", "1000002 707-320"], "val": ["1000003 A300B4"], "test": ["1000004 F-16A/B"]}
    for split, rows in lines.items():
        (ddir / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for r in rows:
            write_image(ddir / "images" / f"{r.split()[0]}.jpg")
    ds = R.read_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == tuple(variants)
    assert [(Path(s.path).name, s.label) for s in ds.train] == [("1000001.jpg", 2), ("1000002.jpg", 0)]
    assert ds.templates == ("a photo of a {}, a type of aircraft.",)
    (ddir / "images_variant_test.txt").write_text("1000004 Boeing 999\n")
    with pytest.raises(DatasetLayoutError, match="'Boeing 999' is not in variants.txt"):
        R.read_dataset("fgvc_aircraft", tmp_path)


# ----------------------------------------------------------------------------- ImageNet family


def test_imagenet_labels_follow_sorted_train_folders_and_val_is_test(tmp_path):
    table = wnids(4)
    ddir = tmp_path / "imagenet"
    write_classnames(ddir / "classnames.txt", table)
    for w in reversed(list(table)):
        write_images(ddir / "images" / "train" / w, 3, ext="JPEG")
        write_images(ddir / "images" / "val" / w, 2, ext="JPEG")
    ds = R.read_dataset("imagenet", tmp_path)
    assert ds.classnames == tuple(n.replace("_", " ") for n in table.values())
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 0, 8)
    assert ds.train[0].path.endswith(os.path.join("train", "n00000000", "img_000.JPEG"))
    _labels_consistent(ds)


@pytest.mark.parametrize("reader, folder, image_dir, dassl", [
    ("imagenet_a", "imagenet-adversarial", "imagenet-a", "ImageNetA"),
    ("imagenet_r", "imagenet-rendition", "imagenet-r", "ImageNetR"),
    ("imagenet_sketch", "imagenet-sketch", "images", "ImageNetSketch"),
])
def test_imagenet_wnid_variants_use_sorted_subset_order(tmp_path, reader, folder, image_dir, dassl):
    table = wnids(6)
    subset = ["n00000005", "n00000001", "n00000003"]  # a 200-class-style subset, unsorted on purpose
    write_classnames(tmp_path / "imagenet" / "classnames.txt", table)  # fallback location
    for w in subset:
        write_images(tmp_path / folder / image_dir / w, 2)
    (tmp_path / folder / image_dir / "README.txt").write_text("ignored")
    ds = R.read_dataset(reader, tmp_path)
    assert ds.name == dassl and ds.train == () and len(ds.test) == 6
    assert ds.classnames == ("class 1 name", "class 3 name", "class 5 name")
    _labels_consistent(ds)


def test_imagenet_v2_folders_are_label_indices(tmp_path):
    table = wnids(5)
    ddir = tmp_path / "imagenetv2"
    write_classnames(ddir / "classnames.txt", table)
    for i in (0, 3, 4):
        write_images(ddir / "imagenetv2-matched-frequency-format-val" / str(i), 2)
    ds = R.read_dataset("imagenet_v2", tmp_path)
    assert ds.num_classes == 5 and sorted({s.label for s in ds.test}) == [0, 3, 4]
    assert ds.test[2].classname == "class 3 name"
    write_images(ddir / "imagenetv2-matched-frequency-format-val" / "17", 1)
    with pytest.raises(DatasetLayoutError, match="folders must be 0..4"):
        R.read_dataset("imagenet_v2", tmp_path)


def test_imagenet_variant_missing_classnames(tmp_path):
    write_images(tmp_path / "imagenet-sketch" / "images" / "n00000001", 1)
    with pytest.raises(DatasetLayoutError, match="classnames.txt"):
        R.read_dataset("imagenet_sketch", tmp_path)


# ----------------------------------------------------------------------------- Office-Home, MiniDomainNet


def _office_home(root: Path, classes=("Alarm_Clock", "Bike", "Mop"), n=10, real_world_folder="real_world") -> Path:
    for domain in R.OFFICE_HOME_DOMAINS:
        folder = real_world_folder if domain == "real_world" else domain
        for c in classes:
            write_images(root / "office_home" / folder / c, n)
    return root


def test_office_home_domain_split_60_20_20(tmp_path):
    _office_home(tmp_path)
    ds = R.read_dataset("office_home", tmp_path, domain="clipart")
    assert ds.name == "office_home-clipart" and ds.classnames == ("alarm clock", "bike", "mop")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)
    assert {s.domain for s in ds.train} == {"clipart"}
    assert R.read_dataset("office_home", tmp_path, domain="clipart") == ds
    assert R.read_dataset("office_home", tmp_path, domain="clipart", split_seed=5).test != ds.test
    _labels_consistent(ds)


def test_office_home_all_domains_and_original_folder_name(tmp_path):
    _office_home(tmp_path, n=5, real_world_folder="Real World")
    tasks = R.read_domains("office_home", tmp_path)
    assert list(tasks) == ["art", "clipart", "product", "real_world"]
    assert all(t.classnames == tasks["art"].classnames for t in tasks.values())
    assert (len(tasks["real_world"].train), len(tasks["real_world"].val), len(tasks["real_world"].test)) == (9, 3, 3)


def test_office_home_errors(tmp_path):
    with pytest.raises(ValueError, match="domain must be one of art, clipart, product, real_world"):
        R.read_dataset("office_home", tmp_path)
    with pytest.raises(DatasetLayoutError, match="expected <root>/office_home/art/<class>/\\*.jpg"):
        R.read_dataset("office_home", tmp_path, domain="art")


def test_mini_domainnet(tmp_path):
    ddir = tmp_path / "domainnet"
    rows = {"train": ["sketch/aircraft_carrier/a.jpg 0", "sketch/zebra/b.jpg 1", "sketch/zebra/c.jpg 1"],
            "test": ["sketch/aircraft_carrier/d.jpg 0"]}
    for split, lines in rows.items():
        (ddir / "splits_mini").mkdir(parents=True, exist_ok=True)
        (ddir / "splits_mini" / f"sketch_{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            write_image(ddir / line.split()[0])
    ds = R.read_dataset("mini_domainnet", tmp_path, domain="sketch")
    assert ds.classnames == ("aircraft carrier", "zebra")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3, 0, 1)
    assert ds.train[1].path == str(ddir / "sketch" / "zebra" / "b.jpg") and ds.train[1].domain == "sketch"
    with pytest.raises(DatasetLayoutError, match="expected <root>/domainnet/splits_mini/clipart_train.txt"):
        R.read_dataset("mini_domainnet", tmp_path, domain="clipart")


# ----------------------------------------------------------------------------- synthetic world


def test_synthetic_world_domains(tmp_path):
    world = make_synthetic_world(tmp_path / "world", ["photo", "sketch"], ["red_circle", "blue square"])
    assert R.list_domains("synthetic", world) == ("photo", "sketch")
    ds = R.read_dataset("synthetic", world, domain="sketch")
    assert ds.name == "synthetic-sketch" and ds.classnames == ("red circle", "blue square")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.test[0].path == str(world / "sketch" / "red_circle" / "test_0.png") and ds.test[0].domain == "sketch"
    assert set(R.read_domains("synthetic", world)) == {"photo", "sketch"}
    with pytest.raises(ValueError, match="domain must be one of photo, sketch"):
        R.read_dataset("synthetic", world, domain="painting")


def test_synthetic_wrong_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="expected <root>/world.json"):
        R.read_dataset("synthetic", tmp_path, domain="photo")


# ----------------------------------------------------------------------------- data specs (training.data.sources)


def test_cli_data_specs_resolve_through_the_readers(tmp_path):
    from clipheads.training.data.sources import resolve_spec

    world = make_synthetic_world(tmp_path / "world", ["photo"], ["a", "b"])
    assert resolve_spec(str(world / "photo"))["photo"].num_classes == 2
    assert len(resolve_spec(str(world / "splits" / "photo.json"))["photo"].test) == 4
    _office_home(tmp_path / "data", n=5)
    assert resolve_spec(f"office_home:{tmp_path / 'data'}:art")["office_home-art"].num_classes == 3


def test_readers_import_without_torch():
    """Readers only list files: importing them must not pull in torch (fast CLI start, light tools)."""
    import subprocess
    import sys

    code = ("import sys, clipheads.training.data.readers, clipheads.training.data.fewshot, clipheads.training.data.templates, "
            "clipheads.training.protocols.splits; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
