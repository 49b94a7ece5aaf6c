"""`clipheads data synth` never mixes two worlds in one folder, and bad values for `data synth` and
`clipheads demo` are bad input (exit 2, one `clipheads CMD: error: ...` line, no traceback), found
before any work.

Everything runs the real `clipheads.cli.main` in-process on tiny worlds (8 px, 1-4 images per
(domain, class)); the demo cases stub the world generator so that a bad value which slipped through
fails at once instead of running the whole demo.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clipheads.training.data import synth

TINY = ["--image-size", "8", "--workers", "1"]


def cli(capfd, *args) -> subprocess.CompletedProcess:
    from clipheads.cli import main

    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def bad_input(res: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """Exit 2 with exactly one error line (the last line on stderr) and no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and lines, res.stderr
    assert lines[-1].startswith(f"clipheads {prog}: error: "), res.stderr
    assert sum(": error: " in line for line in lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_world(root: Path, per_class: int) -> None:
    """What is on disk is exactly what world.json, the split files and captions.jsonl describe."""
    desc = json.loads((root / "world.json").read_text())
    assert sum(desc["per_class_per_domain"].values()) == per_class
    listed = set()
    for domain in desc["domains"]:
        split = json.loads((root / "splits" / f"{domain}.json").read_text())
        rels = {f"{domain}/{rel}" for rows in split.values() for rel, _, _ in rows}
        on_disk = {str(p.relative_to(root)) for p in (root / domain).rglob("*.png")}
        assert on_disk == rels, sorted(on_disk ^ rels)[:5]  # the ImageFolder view agrees with the split file
        assert len(list((root / domain / "circle").iterdir())) == per_class
        listed |= rels
    captions = [json.loads(line)["path"] for line in (root / "captions.jsonl").read_text().splitlines()]
    assert set(captions) == listed and len(captions) == desc["total_images"] == len(listed)
    assert {p.name for p in root.iterdir() if p.is_dir()} <= {"splits", *desc["domains"]}  # no staging folder left
    assert not [p for p in root.iterdir() if p.name.startswith(synth.STAGING_PREFIX)]


# ---- a second world into the same folder ---------------------------------------------------------
def test_a_second_world_into_a_worlds_folder_is_refused_then_replaced_with_overwrite(tmp_path, capfd):
    out = tmp_path / "world"
    assert cli(capfd, "data", "synth", out, "--per-class", "2,1,1", *TINY).returncode == 0
    assert_one_world(out, 4)
    (out / "notes.txt").write_text("mine")  # not part of the world: kept by --overwrite
    before = tree(out)

    res = cli(capfd, "data", "synth", out, "--per-class", "1,0,0", *TINY)
    bad_input(res, "data synth", "already holds a synthetic world", "--overwrite")
    assert tree(out) == before  # refused before any work: nothing written, nothing removed
    assert "wrote" not in res.stdout

    res = cli(capfd, "data", "synth", out, "--per-class", "1,1,1", *TINY, "--overwrite", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"] == 3 * len(synth.CLASSES) * len(synth.DOMAINS)
    assert_one_world(out, 3)
    assert (out / "notes.txt").read_text() == "mine"
    # the same world as one written into a fresh folder, byte for byte
    fresh = synth.generate_world(tmp_path / "fresh", seed=0, size=synth.WorldSize(1, 1, 1), image_size=8, workers=1)
    assert tree(fresh) == {k: v for k, v in tree(out).items() if k != "notes.txt"}


def test_overwrite_never_deletes_what_is_not_a_world(tmp_path, capfd):
    other = tmp_path / "other"
    (other / "photo").mkdir(parents=True)
    (other / "photo" / "holiday.png").write_bytes(b"not ours")
    for extra in ([], ["--overwrite"]):
        bad_input(cli(capfd, "data", "synth", other, "--per-class", "1,0,0", *TINY, *extra), "data synth",
                  "holds no synthetic world", "photo")
    assert tree(other) == {"photo/holiday.png": b"not ours"}

    (other / "world.json").write_text('{"seed": 1}')  # some other program's world.json
    bad_input(cli(capfd, "data", "synth", other, "--per-class", "1,0,0", *TINY, "--overwrite"), "data synth",
              "world.json was not written by")
    assert (other / "photo" / "holiday.png").exists()

    # a sketch-only world next to a folder of the user's that the full world would write into
    mixed = synth.generate_world(tmp_path / "mixed", seed=0, size=synth.WorldSize(1, 0, 0), image_size=8, workers=1,
                                 domains=("sketch",))
    (mixed / "photo").mkdir()
    (mixed / "photo" / "mine.png").write_bytes(b"mine")
    before = tree(mixed)
    bad_input(cli(capfd, "data", "synth", mixed, "--per-class", "1,0,0", *TINY, "--overwrite"), "data synth",
              "photo", "not part of")
    assert tree(mixed) == before

    afile = tmp_path / "afile"
    afile.write_text("x")
    bad_input(cli(capfd, "data", "synth", afile, "--per-class", "1,0,0", *TINY), "data synth", "not a directory")
    assert afile.read_text() == "x"


def test_the_library_replaces_a_world_whole_and_keeps_it_when_rendering_fails(tmp_path, monkeypatch):
    out = tmp_path / "w"
    synth.generate_world(out, seed=0, size=synth.WorldSize(2, 0, 1), image_size=8, workers=1)
    with pytest.raises(synth.WorldExistsError, match="already holds"):
        synth.generate_world(out, seed=1, size=synth.WorldSize(1, 0, 0), image_size=8, workers=1, overwrite=False)
    # a world with fewer domains drops the old world's other domain folders
    synth.generate_world(out, seed=1, size=synth.WorldSize(1, 0, 0), image_size=8, workers=1, domains=("sketch",))
    assert sorted(p.name for p in out.iterdir()) == ["captions.jsonl", "sketch", "splits", "world.json"]
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["sketch.json"]
    assert_one_world(out, 1)

    # a run that fails half-way (or a stale staging folder of a killed one) leaves the old world as it was
    (out / f"{synth.STAGING_PREFIX}killed").mkdir()
    before = tree(out)

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(synth, "_run_jobs", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        synth.generate_world(out, seed=2, size=synth.WorldSize(1, 1, 1), image_size=8, workers=1)
    assert tree(out) == before
    with pytest.raises(RuntimeError):
        synth.generate_world(tmp_path / "new", seed=2, size=synth.WorldSize(1, 0, 0), image_size=8, workers=1)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    synth.generate_world(out, seed=2, size=synth.WorldSize(1, 0, 0), image_size=8, workers=1)
    assert_one_world(out, 1)  # the stale staging folder went with the old world


# ---- bad values ---------------------------------------------------------------------------------
SYNTH_BAD = [
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "5000"], "--image-size"),
    (["--seed", "-1", "--per-class", "1,0,0"], "--seed"),
    (["--per-class", "1,2"], "--per-class"),
    (["--per-class", "0,0,0"], "--per-class"),
    (["--per-class=-1,1,1"], "--per-class"),
    (["--workers", "0", "--per-class", "1,0,0"], "--workers"),
]


@pytest.mark.parametrize("args,needle", SYNTH_BAD, ids=[" ".join(a) for a, _ in SYNTH_BAD])
def test_synth_bad_values_are_one_line_and_exit_2(args, needle, tmp_path, monkeypatch, capfd):
    out = tmp_path / "w2"

    def started(*a, **k):  # a value that slipped through fails here, before rendering 5000 px images
        raise AssertionError("rendering started despite bad input")

    monkeypatch.setattr(synth, "_run_jobs", started)
    res = cli(capfd, "data", "synth", out, *args, "--json")
    bad_input(res, "data synth", needle)
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2
    assert not out.exists()  # refused before any work


def test_library_refuses_bad_values_before_writing(tmp_path):
    for kw in ({"seed": -1}, {"image_size": 0}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            synth.generate_world(tmp_path / "w", size=synth.WorldSize(1, 0, 0), workers=1, **kw)
    with pytest.raises(ValueError):
        synth.WorldSize(-1, 1, 1)
    assert not (tmp_path / "w").exists()


@pytest.fixture
def no_demo_work(monkeypatch):
    """A demo that got past its checks would write a world first: make that fail the test at once."""
    def started(*a, **k):
        raise AssertionError("the demo started work despite bad input")

    monkeypatch.setattr(synth, "generate_world", started)


DEMO_BAD = [
    (["--shots", "-3"], "--shots"),
    (["--shots", "0"], "--shots"),
    (["--shots", "17"], "--shots"),  # the small world has 16 training images per class
    (["--epochs", "0"], "--epochs"),
    (["--probes", "0"], "--probes"),
    (["--gate-images", "3"], "--probes"),
    (["--seed", "-1"], "--seed"),
    (["--domain", "moon"], "--domain"),
]


@pytest.mark.parametrize("args,needle", DEMO_BAD, ids=[" ".join(a) for a, _ in DEMO_BAD])
def test_demo_bad_values_are_one_line_and_exit_2(args, needle, no_demo_work, tmp_path, capfd):
    res = cli(capfd, "demo", "--out", tmp_path / "d", "--no-serve", *args, "--json")
    bad_input(res, "demo", needle)
    assert json.loads(res.stdout)["exit_code"] == 2
    assert not (tmp_path / "d").exists()


def test_demo_out_must_be_a_directory(no_demo_work, tmp_path, capfd):
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad_input(cli(capfd, "demo", "--out", afile, "--no-serve"), "demo", "not a directory")
    assert afile.read_text() == "x"


def test_demo_refuses_a_world_folder_holding_something_else(tmp_path, monkeypatch, capfd):
    """The real generator: OUT/world with a stranger's files is refused before anything is rendered."""
    def started(*a, **k):
        raise AssertionError("the demo went on past the world step")

    monkeypatch.setattr(synth, "_run_jobs", started)
    monkeypatch.setattr("clipheads.training.backbone.load_backbone", started)
    (tmp_path / "d" / "world").mkdir(parents=True)
    (tmp_path / "d" / "world" / "junk.txt").write_text("x")
    bad_input(cli(capfd, "demo", "--out", tmp_path / "d", "--no-serve", "-q"), "demo", "holds no synthetic world")
    assert [p.name for p in (tmp_path / "d" / "world").iterdir()] == ["junk.txt"]


def test_demo_probe_minimum_is_the_exporters():
    pytest.importorskip("onnxruntime")
    from clipheads.demo import MIN_PROBES
    from clipheads.export.pipeline import ExportOptions, ExportUsageError

    ExportOptions(probes=MIN_PROBES).validate()
    with pytest.raises(ExportUsageError, match="probe"):
        ExportOptions(probes=MIN_PROBES - 1).validate()
