"""The synthetic world: deterministic bytes, the DESIGN.md layout, split_zhou format, counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipheads.training.data import synth
from clipheads.training.data.records import DatasetSplits


# A few images per (domain, class) keep every test fast; the presets only change these counts.
COUNTS = synth.WorldSize(train=2, val=1, test=1)
SIZE = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return synth.generate_world(tmp_path_factory.mktemp("w0"), seed=0, size=COUNTS, image_size=SIZE, workers=1)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_vocabulary_sizes_and_names():
    assert len(synth.CLASSES) >= 30 and len(set(synth.CLASSES)) == len(synth.CLASSES)
    assert len(synth.COLOURS) >= 8
    assert synth.DOMAINS == ("photo", "clipart", "sketch", "painting")
    for name in synth.CLASSES:  # natural words a text encoder can read; underscores only between words
        assert name.replace("_", "").isalpha() and name.islower() and not name.startswith("_") and not name.endswith("_")


def test_same_seed_gives_identical_bytes_and_other_seed_differs(world, tmp_path):
    again = synth.generate_world(tmp_path / "again", seed=0, size=COUNTS, image_size=SIZE, workers=2)
    a, b = _tree(world), _tree(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = _tree(synth.generate_world(tmp_path / "other", seed=1, size=COUNTS, image_size=SIZE, workers=2))
    pngs = [k for k in a if k.endswith(".png")]
    differing = sum(a[k] != other[k] for k in pngs)
    assert differing > 0.95 * len(pngs)
    assert a["world.json"] != other["world.json"]


def test_one_domain_has_the_full_worlds_bytes(world, tmp_path):
    """`domains=` (tests that need one domain render a quarter of the world): the same images and
    split file as that domain of the full world; world.json lists only it; unknown names refused."""
    one = synth.generate_world(tmp_path / "one", seed=0, size=COUNTS, image_size=SIZE, workers=1, domains=("sketch",))
    a, full = _tree(one), _tree(world)
    sketch = [k for k in a if k.startswith("sketch/") or k == "splits/sketch.json"]
    assert sketch and [k for k in sketch if a[k] != full[k]] == []
    assert {k.split("/")[0] for k in a if "/" in k} == {"sketch", "splits"} and set(a) - set(full) == set()
    desc = json.loads(a["world.json"])
    assert desc["domains"] == ["sketch"] and list(desc["counts"]) == ["sketch"]
    mine, theirs = synth.load_world_splits(one, "sketch"), synth.load_world_splits(world, "sketch")
    assert mine.classnames == theirs.classnames and [(Path(s.path).relative_to(one), s.label) for s in mine.test] == [
        (Path(s.path).relative_to(world), s.label) for s in theirs.test]
    with pytest.raises(ValueError, match="domains must be some of"):
        synth.generate_world(tmp_path / "bad", seed=0, size=COUNTS, image_size=SIZE, workers=1, domains=("moon",))


def test_layout_world_json_and_counts(world):
    desc = json.loads((world / "world.json").read_text())
    ws = COUNTS
    assert desc["domains"] == list(synth.DOMAINS)
    assert desc["classes"] == list(synth.CLASSES)
    assert desc["colours"] == list(synth.COLOURS) and desc["sizes"] == list(synth.SIZES)
    assert desc["seed"] == 0 and desc["image_size"] == SIZE and desc["generator_version"] == synth.GENERATOR_VERSION
    n = len(synth.CLASSES)
    for domain in synth.DOMAINS:
        class_dirs = sorted(p.name for p in (world / domain).iterdir())
        assert class_dirs == sorted(synth.CLASSES)
        assert len(list((world / domain).rglob("*.png"))) == ws.per_class * n
        assert desc["counts"][domain] == {"train": ws.train * n, "val": ws.val * n, "test": ws.test * n}
    img = Image.open(next((world / "sketch" / "star").glob("*.png")))
    assert img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_split_json_is_split_zhou(world):
    for domain in synth.DOMAINS:
        text = (world / "splits" / f"{domain}.json").read_text()
        assert text.startswith('{\n    "train": [\n')  # indent=4, CoOp's own formatting
        split = json.loads(text)
        assert list(split) == ["train", "val", "test"]
        rels = []
        for name, entries in split.items():
            for rel, label, classname in entries:
                assert isinstance(rel, str) and isinstance(label, int) and isinstance(classname, str)
                assert synth.CLASSES[label] == classname
                assert (world / domain / rel).is_file()
                rels.append(rel)
        assert len(rels) == len(set(rels)) == len(list((world / domain).rglob("*.png")))
        per_label = [sum(1 for _, y, _ in split["train"] if y == k) for k in range(len(synth.CLASSES))]
        assert set(per_label) == {COUNTS.train}


def test_captions_cover_every_image_and_name_its_attributes(world):
    rows = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == len(list(world.rglob("*.png")))
    assert {r["domain"] for r in rows} == set(synth.DOMAINS)
    assert len({r["colour"] for r in rows}) == len(synth.COLOURS)  # 512 draws cover all 10 colours
    assert {r["size"] for r in rows} == set(synth.SIZES)
    for r in rows[::37]:
        assert (world / r["path"]).is_file()
        assert r["path"].startswith(f"{r['domain']}/{r['class']}/")
        cap = r["caption"]
        assert r["class"].replace("_", " ") in cap and r["colour"] in cap and r["size"] in cap
        assert synth.DOMAIN_WORDS[r["domain"]] in cap


def test_load_world_splits(world):
    ds = synth.load_world_splits(world, "painting")
    assert isinstance(ds, DatasetSplits)
    assert ds.classnames == synth.CLASSES and ds.templates == ("a photo of a {}.",)
    ws = COUNTS
    assert (len(ds.train), len(ds.val), len(ds.test)) == tuple(n * len(synth.CLASSES) for n in (ws.train, ws.val, ws.test))
    s = ds.test[0]
    assert Path(s.path).is_absolute() and Path(s.path).is_file() and s.domain == "painting"
    assert ds.classnames[s.label] == s.classname
    with pytest.raises(ValueError, match="unknown domain"):
        synth.load_world_splits(world, "cartoon")


def test_domains_render_differently():
    """The same instance drawn in each domain gives four clearly different images."""
    import numpy as np

    arrays = {d: np.asarray(synth.render(synth.sample_instance(d, "umbrella", (7, 0, 0, 0)), 48), np.float32) for d in synth.DOMAINS}
    sketch = arrays["sketch"]
    assert sketch.mean() > 180  # mostly paper
    for a in synth.DOMAINS:
        for b in synth.DOMAINS:
            if a < b:
                assert np.abs(arrays[a] - arrays[b]).mean() > 10, (a, b)


def test_presets():
    small, full = synth.WORLD_SIZES["small"], synth.WORLD_SIZES["full"]
    assert small.train >= 16 and full.train >= 16  # enough for 16-shot protocols
    desc = synth.world_description(0, "small", 64)
    assert desc["total_images"] == small.per_class * len(synth.CLASSES) * len(synth.DOMAINS)
    with pytest.raises(ValueError, match="size must be one of"):
        synth.generate_world("/nonexistent-never-written", size="huge")


def test_cli_main_writes_world(tmp_path, capsys):
    assert synth.main([str(tmp_path / "cli"), "--seed", "3", "--per-class", "1,0,1", "--image-size", "16", "--workers", "1"]) == 0
    desc = json.loads((tmp_path / "cli" / "world.json").read_text())
    assert desc["seed"] == 3 and desc["image_size"] == 16 and desc["total_images"] == 2 * len(synth.CLASSES) * len(synth.DOMAINS)
    assert "wrote 256 images" in capsys.readouterr().out
    assert synth.main([str(tmp_path / "bad"), "--per-class", "1,2"]) == 2  # bad input: one line, exit 2
    assert "--per-class wants three integers" in capsys.readouterr().err
