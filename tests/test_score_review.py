"""Batch scoring (`clipheads score`) fixes from a review, on a real micro head and real files.

- the byte and pixel caps are part of the job: a rerun with another cap is refused (--overwrite);
- one job writes OUT at a time (flock on OUT/_lock): a second one is exit 2, nothing duplicated;
- a huge --max-bytes reads each file's size, not the cap (no MemoryError); absurd caps: exit 2;
- files added to / removed from the input directory during a run are reported, not a failure;
- a CSV with a UTF-8 byte-order mark is read;
- a subdirectory that cannot be listed is an `unreadable` error record; an unreadable input: exit 2;
- a Parquet dataset directory as --input is refused (not scored as a folder of broken images);
- --errors inside OUT must be `_`-named directly in OUT (a dataset reader would read it as data);
- an interrupted --overwrite leaves a folder that is still ours (the manifest goes last);
- a part whose errors sidecar is missing is recomputed, like a lost part file;
- --commit-every nan: exit 2.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")

from test_serving import make_micro_head  # noqa: E402


@pytest.fixture(scope="module")
def head(tmp_path_factory, monkeypatch_module):
    return make_micro_head(tmp_path_factory.mktemp("head"))


@pytest.fixture(scope="module")
def runtime(head):
    """One Runtime for the in-process runs (opening one per run is most of a small run's time)."""
    from clipheads.serving.runtimes import open_runtime

    return open_runtime(str(head), "auto")


def _png(path: Path, seed: int, size: int = 36) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _images(d: Path, n: int, prefix: str = "img") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _png(d / f"{prefix}{i}.png", i)
    return d


def _job(head, inp, out, **kw):
    from clipheads.serving.scoring import ScoreJob

    base = dict(source=str(head), input=str(inp), output=str(out), progress=False, top_k=2, workers=1, batch_size=4)
    base.update(kw)
    return ScoreJob(**base)


def _score(head, inp, out, runtime=None, **kw):
    from clipheads.serving.scoring import score

    return score(_job(head, inp, out, **kw), runtime=runtime)


def _cli(head, inp, out, *flags) -> int:
    from clipheads.serving.scoring.cli import main

    return main([str(head), "--input", str(inp), "--output", str(out), "--top-k", "2", "--workers", "1",
                 "--no-progress", "-q", *flags])


def _errors(out: Path, name: str = "_errors.jsonl") -> dict[str, str]:
    return {e["path"]: e["kind"] for e in map(json.loads, (out / name).read_text().splitlines())}


def _indices(out: Path) -> list[int]:
    return sorted(pq.read_table(out).column("index").to_pylist())


# ---- 1. caps are part of the job -----------------------------------------------------------------
def test_byte_and_pixel_caps_are_part_of_the_job_identity(head, runtime, tmp_path, capsys):
    from clipheads.serving.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from clipheads.serving.scoring.shards import OutputConflict

    inp = _images(tmp_path / "in", 2)
    _png(inp / "big.png", 7, size=200)  # ~120 kB
    out = tmp_path / "out.parquet"
    s = _score(head, inp, out, runtime, max_bytes=50_000)
    assert (s.scored, s.failed) == (2, 1) and _errors(out) == {"big.png": "too_many_bytes"}
    assert json.loads((out / "_manifest.json").read_text())["job"]["max_bytes"] == 50_000
    for kw, field in (({"max_bytes": 500_000}, "max_bytes"), ({"max_bytes": 50_000, "max_pixels": 10}, "max_pixels"),
                      ({}, "max_bytes")):  # the default cap is a cap too
        with pytest.raises(OutputConflict, match=f"different job.*{field}"):
            _score(head, inp, out, runtime, **kw)
    assert _cli(head, inp, out, "--max-bytes", "500000") == 2
    assert "--overwrite" in capsys.readouterr().err
    again = _score(head, inp, out, runtime, max_bytes=50_000)  # the same caps: resumed, nothing rescored
    assert (again.skipped, again.scored) == (3, 0)
    s = _score(head, inp, out, runtime, max_bytes=500_000, overwrite=True)  # the old cap's errors are gone
    assert (s.scored, s.failed, s.errors_total) == (3, 0, 0)

    # the identity holds the effective caps: the defaults spelled out are the same job
    out2 = tmp_path / "out2.parquet"
    _score(head, inp, out2, runtime)
    s = _score(head, inp, out2, runtime, max_bytes=DEFAULT_MAX_BYTES, max_pixels=DEFAULT_MAX_PIXELS)
    assert (s.skipped, s.scored) == (3, 0)


# ---- 2. one job per OUT --------------------------------------------------------------------------
def test_a_second_job_writing_the_same_output_is_refused(head, runtime, tmp_path, capsys):
    from clipheads.serving.scoring.shards import LOCK, OutputConflict, ShardStore

    inp = _images(tmp_path / "in", 3)
    out = tmp_path / "out.parquet"
    _score(head, inp, out, runtime, shard_size=2)
    assert (out / LOCK).is_file()
    identity = json.loads((out / "_manifest.json").read_text())["job"]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with ShardStore(out, identity):  # another job is writing OUT (the lock is per open file)
        with pytest.raises(OutputConflict, match="another clipheads score job is writing"):
            _score(head, inp, out, runtime, shard_size=2)
        with pytest.raises(OutputConflict, match="another clipheads score job is writing"):
            _score(head, inp, out, runtime, shard_size=2, overwrite=True)  # nor cleared under it
        capsys.readouterr()
        assert _cli(head, inp, out, "--shard-size", "2") == 2
        err = capsys.readouterr().err
        assert "another clipheads score job is writing" in err and "Traceback" not in err
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir() if p.name != LOCK) == \
            [b for b in before if b[0] != LOCK]
    s = _score(head, inp, out, runtime, shard_size=2)  # released: the same command resumes
    assert (s.skipped, s.rows_total) == (3, 3)
    assert _indices(out) == [0, 1, 2]  # the lock file is not data for a dataset reader
    import pyarrow.dataset as ds

    assert ds.dataset(out).to_table().num_rows == 3
    # a refusal releases the lock too; --overwrite keeps (and takes) it
    with pytest.raises(OutputConflict, match="different job"):
        _score(head, inp, out, runtime, shard_size=3)
    assert _score(head, inp, out, runtime, shard_size=3, overwrite=True).rows_total == 3
    assert (out / LOCK).is_file()

    # a folder that is not ours is refused without a lock file left in it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(OutputConflict):
            _score(head, inp, mine, runtime, **kw)
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # a folder holding only a lock (a run killed before its first manifest) is an empty output
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK).write_bytes(b"")
    assert _score(head, inp, fresh, runtime).rows_total == 3


# ---- 3. a huge byte cap --------------------------------------------------------------------------
def test_a_huge_byte_cap_reads_only_the_file(head, runtime, tmp_path, capsys):
    from clipheads.serving.images import DecodeSpec
    from clipheads.serving.scoring import UsageError
    from clipheads.serving.scoring.job import MAX_CAP, load_item, validate

    inp = _images(tmp_path / "in", 3)
    s = _score(head, inp, tmp_path / "out.parquet", runtime, max_bytes=10**15, max_pixels=10**15)
    assert (s.scored, s.failed) == (3, 0)  # was: every image invalid_image (MemoryError)
    size = (inp / "img0.png").stat().st_size
    assert load_item(str(inp / "img0.png"), DecodeSpec(image_size=32, max_bytes=MAX_CAP)).shape == (3, 32, 32)
    assert load_item(str(inp / "img0.png"), DecodeSpec(image_size=32, max_bytes=size)).shape == (3, 32, 32)
    for kw in ({"max_bytes": MAX_CAP + 1}, {"max_pixels": 10**30}):
        with pytest.raises(UsageError, match="must be <="):
            validate(_job(head, inp, tmp_path / "x.parquet", **kw))
    validate(_job(head, inp, tmp_path / "x.parquet", max_bytes=MAX_CAP, max_pixels=MAX_CAP))
    capsys.readouterr()
    assert _cli(head, inp, tmp_path / "y.parquet", "--max-bytes", str(10**30)) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "y.parquet").exists()


# ---- 4. the input changes during a run -----------------------------------------------------------
def _after_count(monkeypatch, change):
    """Run `change()` right after the job counted its inputs, before the scoring pass lists them
    (what a file arriving or leaving while a job runs does)."""
    from clipheads.serving.scoring.listing import InputListing

    real = InputListing.count

    def count(self):
        n = real(self)
        change()
        return n

    monkeypatch.setattr(InputListing, "count", count)


def test_inputs_added_or_removed_during_a_run_are_reported_not_a_failure(head, runtime, tmp_path, monkeypatch, capsys):
    inp = _images(tmp_path / "in", 4)
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as mp:
        _after_count(mp, lambda: _png(inp / "zz_new.png", 9))
        s = _score(head, inp, out, runtime, shard_size=2)
    assert (s.scored, s.total, s.rows_total) == (5, 5, 5)
    assert s.extra["listing_changed"] == {"counted": 4, "listed": 5}
    m = json.loads((out / "_manifest.json").read_text())
    assert m["complete"] and m["last_run"]["total"] == 5
    assert _indices(out) == list(range(5))
    again = _score(head, inp, out, runtime, shard_size=2)  # the next run sees the same inputs: all committed
    assert (again.skipped, again.scored) == (5, 0) and "listing_changed" not in again.extra

    out2 = tmp_path / "out2.parquet"  # removed, through the command line: exit 0 with a warning
    with monkeypatch.context() as mp:
        _after_count(mp, lambda: (inp / "zz_new.png").unlink())
        capsys.readouterr()
        assert _cli(head, inp, out2, "--shard-size", "2", "--json") == 0
    cap = capsys.readouterr()
    assert "warning: the input changed while it was scored (5 inputs counted at the start, 4 listed" in cap.err
    assert "Traceback" not in cap.err
    assert json.loads(cap.out)["total"] == 4 and _indices(out2) == list(range(4))


def test_committed_parts_past_what_the_scoring_pass_listed_are_still_refused(head, runtime, tmp_path, monkeypatch):
    from clipheads.serving.scoring.shards import OutputConflict

    inp = _images(tmp_path / "in", 6)
    out = tmp_path / "out.parquet"
    _score(head, inp, out, runtime, shard_size=2)

    def remove():
        (inp / "img4.png").unlink()
        (inp / "img5.png").unlink()  # the last committed shard goes after the count

    with monkeypatch.context() as mp:
        _after_count(mp, remove)
        with pytest.raises(OutputConflict, match="part-00002.parquet changed"):
            _score(head, inp, out, runtime, shard_size=2)


# ---- 5. a CSV with a byte-order mark -------------------------------------------------------------
def test_a_csv_with_a_utf8_bom_is_read(head, runtime, tmp_path):
    inp = _images(tmp_path / "in", 3)
    listing = tmp_path / "bom.csv"
    listing.write_bytes(b"\xef\xbb\xbfpath,id\n" + b"".join(f"{inp}/img{i}.png,{i}\n".encode() for i in range(3)))
    out = tmp_path / "out.parquet"
    s = _score(head, listing, out, runtime)
    assert (s.scored, s.failed) == (3, 0)
    assert pq.read_table(out).column("path").to_pylist() == [f"{inp}/img{i}.png" for i in range(3)]


# ---- 6. unreadable directories -------------------------------------------------------------------
def _unlistable(monkeypatch, *dirs: Path) -> None:
    """os.scandir refuses these directories, as for a directory without read permission (which
    the tests, running as root, cannot make)."""
    real, refused = os.scandir, {str(d) for d in dirs}

    def scandir(path="."):
        if str(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subdirectory_is_an_error_record(head, runtime, tmp_path, monkeypatch, capsys):
    inp = _images(tmp_path / "in", 2)
    _images(inp / "locked", 2)
    _images(inp / "ok", 1)
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as mp:
        _unlistable(mp, inp / "locked")
        s = _score(head, inp, out, runtime)
    assert (s.scored, s.failed, s.total) == (3, 1, 4)
    assert sorted(pq.read_table(out).column("path").to_pylist()) == ["img0.png", "img1.png", "ok/img0.png"]
    err = json.loads((out / "_errors.jsonl").read_text())
    assert (err["path"], err["kind"]) == ("locked/", "unreadable") and "PermissionError" in err["detail"]

    capsys.readouterr()  # the input directory itself: exit 2, nothing written
    with monkeypatch.context() as mp:
        _unlistable(mp, inp)
        assert _cli(head, inp, tmp_path / "out2.parquet") == 2
    e = capsys.readouterr().err
    assert "cannot list the input directory" in e and "Traceback" not in e
    assert not (tmp_path / "out2.parquet").exists()


# ---- 7. a Parquet dataset directory as --input ---------------------------------------------------
def test_a_parquet_dataset_directory_is_refused_as_input(head, runtime, tmp_path, capsys):
    import pyarrow as pa

    imgs = _images(tmp_path / "imgs", 2)
    table = pa.table({"path": [str(imgs / "img0.png"), str(imgs / "img1.png")], "k": ["a", "b"]})
    spark = tmp_path / "listing.parquet"  # what Spark writes
    spark.mkdir()
    pq.write_table(table, spark / "part-00000-abc.snappy.parquet")
    (spark / "_SUCCESS").write_bytes(b"")
    hive = tmp_path / "hive"
    pq.write_to_dataset(table, hive, partition_cols=["k"])
    scores = tmp_path / "scores.parquet"  # a scores output fed back as input
    _score(head, imgs, scores, runtime)
    said = {}
    for d in (spark, hive, scores):
        out = tmp_path / f"out-{d.name}"
        capsys.readouterr()
        assert _cli(head, d, out) == 2, d
        said[d.name] = e = capsys.readouterr().err
        assert "is a Parquet dataset" in e and "give one Parquet file" in e and "Traceback" not in e, e
        assert not out.exists()
    assert f"e.g. {spark / 'part-00000-abc.snappy.parquet'}" in said[spark.name]

    # an image folder that also holds a Parquet file (or subfolders) is still an image folder
    pq.write_table(table, imgs / "meta.parquet")
    s = _score(head, imgs, tmp_path / "out-imgs", runtime)
    assert (s.scored, s.failed) == (2, 1) and _errors(tmp_path / "out-imgs") == {"meta.parquet": "unsupported_format"}


# ---- 8. --errors inside OUT ----------------------------------------------------------------------
def test_errors_inside_the_output_must_be_underscore_named(head, runtime, tmp_path, capsys):
    from clipheads.serving.scoring import UsageError

    inp = _images(tmp_path / "in", 2)
    (inp / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out.parquet"
    for errors in (out / "errs.csv", out / "sub" / "_errs.csv", out / "_errors" / "x.jsonl", out / "_manifest.json",
                   out / "_lock"):
        with pytest.raises(UsageError, match="--errors"):
            _score(head, inp, out, runtime, errors=str(errors))
        assert not out.exists()
    capsys.readouterr()
    assert _cli(head, inp, out, "--errors", str(out / "errs.csv")) == 2
    assert "whose name starts with '_'" in capsys.readouterr().err and not out.exists()

    s = _score(head, inp, out, runtime, errors=str(out / "_errs.csv"))
    assert (s.scored, s.failed) == (2, 1)
    assert (out / "_errs.csv").read_text().splitlines()[1].startswith("0,bad.png,invalid_image,")
    assert _indices(out) == [1, 2]  # still readable as a dataset
    # --overwrite knows it as ours: with the same --errors, and after it (recorded in the manifest)
    assert _score(head, inp, out, runtime, errors=str(out / "_errs.csv"), overwrite=True).rows_total == 2
    assert _score(head, inp, out, runtime, overwrite=True, top_k=1).rows_total == 2
    assert not (out / "_errs.csv").exists() and (out / "_errors.jsonl").is_file()


# ---- 9. an interrupted --overwrite ---------------------------------------------------------------
class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_an_interrupted_overwrite_leaves_an_output_overwrite_clears(head, runtime, tmp_path, monkeypatch):
    inp = _images(tmp_path / "in", 5)
    (inp / "bad.png").write_bytes(b"not an image")
    template = tmp_path / "template"
    _score(head, inp, template, runtime, shard_size=1)
    n_entries = sum(1 for p in template.rglob("*") if p.name != "_lock")  # what --overwrite deletes
    out = tmp_path / "out.parquet"
    for k in range(n_entries):  # killed at every deletion in turn
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(template, out)
        calls = {"n": 0}
        real_unlink, real_rmdir = Path.unlink, Path.rmdir

        def counted(real):
            def f(self, *a, **kw):
                if calls["n"] == k:
                    raise _Killed
                calls["n"] += 1
                return real(self, *a, **kw)
            return f

        with monkeypatch.context() as mp:
            mp.setattr(Path, "unlink", counted(real_unlink))
            mp.setattr(Path, "rmdir", counted(real_rmdir))
            with pytest.raises(_Killed):
                _score(head, inp, out, runtime, shard_size=2, overwrite=True)
        left = {p.name for p in out.iterdir()}
        assert "_manifest.json" in left or not any(n.startswith("part-") for n in left), (k, sorted(left))
        s = _score(head, inp, out, runtime, shard_size=2, overwrite=True)  # the same command clears it
        assert (s.rows_total, s.errors_total) == (5, 1), k


# ---- 10. a lost errors sidecar -------------------------------------------------------------------
def test_a_part_whose_errors_sidecar_is_missing_is_recomputed(head, runtime, tmp_path):
    inp = _images(tmp_path / "in", 4, prefix="a")
    (inp / "b_bad.png").write_bytes(b"not an image")
    out = tmp_path / "out.parquet"
    s = _score(head, inp, out, runtime, shard_size=2)
    assert (s.scored, s.failed) == (4, 1)
    (out / "_errors" / "part-00002.jsonl").unlink()  # the shard holding the bad image
    s = _score(head, inp, out, runtime, shard_size=2)  # was: exit 1 on every rerun (4 rows + 0 errors for 5)
    assert (s.skipped, s.scored, s.failed, s.rows_total, s.errors_total) == (4, 0, 1, 4, 1)
    assert _errors(out) == {"b_bad.png": "unsupported_format"}
    (out / "_errors" / "part-00000.jsonl").unlink()  # an errorless part's sidecar: recomputed too
    s = _score(head, inp, out, runtime, shard_size=2)
    assert (s.skipped, s.scored, s.rows_total, s.errors_total) == (3, 2, 4, 1)
    assert (out / "_errors" / "part-00000.jsonl").is_file() and _indices(out) == [0, 1, 2, 3]
    assert json.loads((out / "_manifest.json").read_text())["complete"]


# ---- --commit-every nan ----------------------------------------------------------------------------
def test_nan_commit_every_and_ray_resources_are_refused(head, tmp_path, capsys):
    from clipheads.serving.scoring import UsageError
    from clipheads.serving.scoring.job import validate

    for kw in ({"commit_every_s": float("nan")}, {"ray_num_gpus": float("nan")}, {"ray_num_cpus": float("inf")}):
        with pytest.raises(UsageError, match="must be"):
            validate(_job(head, tmp_path, tmp_path / "out.parquet", **kw))
    validate(_job(head, tmp_path, tmp_path / "out.parquet", commit_every_s=float("inf")))  # never by time
    capsys.readouterr()
    assert _cli(head, tmp_path, tmp_path / "out.parquet", "--commit-every", "nan") == 2
    assert "commit-every must be >= 0" in capsys.readouterr().err and not (tmp_path / "out.parquet").exists()
