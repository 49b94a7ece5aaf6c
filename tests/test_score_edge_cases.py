"""Batch scoring edge cases (`clipheads score`), on a real micro head and real files.

- a file name that is not UTF-8 is an error record (`bad_name`), not the end of the job;
- inputs removed so that a committed shard disappears: exit 2 (the inputs changed), as for a
  shard whose keys changed;
- a run killed after its first part was renamed into place resumes (the manifest exists from the
  moment OUT is created), and --overwrite still refuses folders that are not ours;
- a corrupt Parquet listing fails before OUT is made, exit 2;
- --errors / --output that cannot be written, byte/pixel caps and Ray CPUs below 1 / 0: exit 2
  before any work;
- --tasks in another order is the same job and every part has the source's field order;
- a CSV that is not UTF-8 says where the bad byte really is;
- an image above Pillow's own decompression-bomb limit is `image_too_large` with its size.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")

from test_serving import make_micro_head  # noqa: E402


@pytest.fixture(scope="module")
def head(tmp_path_factory, monkeypatch_module):
    return make_micro_head(tmp_path_factory.mktemp("head"))


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)
    return path


def _images(d: Path, n: int) -> Path:
    d.mkdir()
    for i in range(n):
        _png(d / f"img{i}.png", i)
    return d


def _job(head, inp, out, **kw):
    from clipheads.serving.scoring import ScoreJob

    base = dict(source=str(head), input=str(inp), output=str(out), progress=False, top_k=2, workers=1,
                batch_size=4)
    base.update(kw)
    return ScoreJob(**base)


def _score(head, inp, out, **kw):
    from clipheads.serving.scoring import score

    return score(_job(head, inp, out, **kw))


def _cli(head, inp, out, *flags, capsys=None) -> int:
    from clipheads.serving.scoring.cli import main

    return main([str(head), "--input", str(inp), "--output", str(out), "--top-k", "2", "--workers", "1",
                 "--no-progress", "-q", *flags])


def _errors(out: Path) -> dict[str, str]:
    return {e["path"]: e["kind"] for e in map(json.loads, (out / "_errors.jsonl").read_text().splitlines())}


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (greyscale) over a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---- 1. a name that is not UTF-8 ---------------------------------------------------------------
def test_a_name_that_is_not_utf8_is_an_error_record(head, tmp_path):
    inp = _images(tmp_path / "in", 3)
    bad = os.path.join(os.fsencode(inp), b"bad\xffname.png")
    with open(bad, "wb") as f:
        f.write((inp / "img0.png").read_bytes())
    (inp / "bomb.png").write_bytes(_png_header_only(20000, 20000))  # above Pillow's own limit
    out = tmp_path / "out.parquet"
    s = _score(head, inp, out, shard_size=2)
    assert (s.scored, s.failed, s.total) == (3, 2, 5)
    assert set(pq.read_table(out).column("path").to_pylist()) == {"img0.png", "img1.png", "img2.png"}
    assert _errors(out) == {"bad\\xffname.png": "bad_name", "bomb.png": "image_too_large"}
    again = _score(head, inp, out, shard_size=2)  # the rerun resumes instead of failing again
    assert (again.skipped, again.scored, again.rows_total, again.errors_total) == (5, 0, 3, 2)


# ---- 2. committed shards beyond the listing ----------------------------------------------------
def test_inputs_removed_under_the_last_committed_shard_exit_2(head, tmp_path, capsys):
    inp = _images(tmp_path / "in", 6)
    out = tmp_path / "out.parquet"
    assert _cli(head, inp, out, "--shard-size", "2") == 0
    (inp / "img4.png").unlink()
    (inp / "img5.png").unlink()  # the whole last shard is gone
    capsys.readouterr()
    assert _cli(head, inp, out, "--shard-size", "2") == 2
    err = capsys.readouterr().err
    assert "part-00002.parquet changed" in err and "Traceback" not in err
    assert len(pq.read_table(out)) == 6  # nothing was rewritten

    from clipheads.serving.scoring.shards import OutputConflict

    for p in inp.iterdir():  # every shard gone
        p.unlink()
    with pytest.raises(OutputConflict, match="part-00000.parquet changed"):
        _score(head, inp, out, shard_size=2)


# ---- 3. killed before the first manifest commit ------------------------------------------------
class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def _kill_at_first_part_commit(monkeypatch):
    """Make the job die right after its first part file was renamed into place, before the
    manifest that lists it is written."""
    from clipheads.serving.scoring.shards import ShardStore

    real = ShardStore.write_manifest

    def write_manifest(self, *a, **kw):
        if self.shards:  # a part is listed: its Parquet file is already in place
            assert any(self.root.glob("part-*.parquet"))
            raise _Killed
        return real(self, *a, **kw)

    monkeypatch.setattr(ShardStore, "write_manifest", write_manifest)


def test_killed_after_the_first_part_resumes(head, tmp_path, monkeypatch):
    inp = _images(tmp_path / "in", 5)
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as mp:
        _kill_at_first_part_commit(mp)
        with pytest.raises(_Killed):
            _score(head, inp, out, shard_size=2)
    assert (out / "part-00000.parquet").is_file()
    s = _score(head, inp, out, shard_size=2)  # resumes: the part nobody listed is recomputed
    assert (s.scored, s.skipped, s.rows_total) == (5, 0, 5)
    assert sorted(pq.read_table(out).column("index").to_pylist()) == list(range(5))
    assert json.loads((out / "_manifest.json").read_text())["complete"]

    with monkeypatch.context() as mp:  # and --overwrite accepts such an output too
        out2 = tmp_path / "out2.parquet"
        _kill_at_first_part_commit(mp)
        with pytest.raises(_Killed):
            _score(head, inp, out2, shard_size=2)
    assert _score(head, inp, out2, shard_size=2, overwrite=True).rows_total == 5


def test_overwrite_still_refuses_a_folder_that_is_not_ours(head, tmp_path):
    from clipheads.serving.scoring.shards import OutputConflict

    inp = _images(tmp_path / "in", 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(OutputConflict):
            _score(head, inp, mine, **kw)
    assert (mine / "thesis.tex").read_text() == "years of work\n" and not (mine / "_manifest.json").exists()



def test_overwrite_deletes_only_what_a_scores_job_wrote(head, tmp_path):
    """A `_manifest.json` of another tool is not a scores output; a real output with the user's own
    file put inside is refused whole (nothing deleted); a clean one is replaced."""
    from clipheads.serving.scoring.shards import OutputConflict

    inp = _images(tmp_path / "in", 2)
    other = tmp_path / "other"
    (other / "photos").mkdir(parents=True)
    (other / "_manifest.json").write_text('{"my": "other tool"}')
    (other / "photos" / "a.txt").write_text("keep")
    with pytest.raises(OutputConflict, match="not a clipheads-scores output"):
        _score(head, inp, other, overwrite=True)
    assert (other / "photos" / "a.txt").read_text() == "keep"

    out = tmp_path / "out"
    _score(head, inp, out)
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputConflict, match="notes.md"):
        _score(head, inp, out, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "_manifest.json").is_file()
    (out / "notes.md").unlink()
    assert _score(head, inp, out, overwrite=True).rows_total == 2


# ---- 4. a corrupt Parquet listing --------------------------------------------------------------
def test_a_corrupt_parquet_listing_fails_before_out_is_made(head, tmp_path, capsys):
    import pyarrow as pa

    listing = tmp_path / "list.parquet"
    paths = [f"/nowhere/{i:06d}-{np.random.default_rng(i).integers(1 << 60)}.png" for i in range(5000)]
    pq.write_table(pa.table({"path": paths}), listing, compression="none", use_dictionary=False)
    data = bytearray(listing.read_bytes())
    data[200:20000] = os.urandom(19800)  # data pages only: the footer (schema, row count) is intact
    listing.write_bytes(bytes(data))
    assert pq.ParquetFile(listing).metadata.num_rows == 5000

    from clipheads.serving.scoring.listing import InputError, InputListing

    with pytest.raises(InputError, match="not a readable Parquet file"):
        InputListing(listing).count()
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(InputListing(listing))
    out = tmp_path / "out.parquet"
    capsys.readouterr()
    assert _cli(head, listing, out) == 2
    err = capsys.readouterr().err
    assert "not a readable Parquet file" in err and "Traceback" not in err
    assert not out.exists()


# ---- 5-7. checked up front ---------------------------------------------------------------------
def test_unwritable_errors_or_output_paths_are_refused_up_front(head, tmp_path, capsys):
    from clipheads.serving.scoring import UsageError

    inp = _images(tmp_path / "in", 2)
    out = tmp_path / "out.parquet"
    errors_dir = tmp_path / "errs"
    errors_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for kw in ({"errors": str(errors_dir)}, {"errors": str(a_file / "errors.jsonl")}):
        with pytest.raises(UsageError, match="is a directory|is not a directory"):
            _score(head, inp, out, **kw)
        assert not out.exists()
    with pytest.raises(UsageError, match="is not a directory"):
        _score(head, inp, a_file / "out.parquet")
    capsys.readouterr()
    assert _cli(head, inp, out, "--errors", str(errors_dir)) == 2
    assert "Traceback" not in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("kw", [{"max_bytes": 0}, {"max_bytes": -5}, {"max_pixels": 0}, {"max_pixels": -1},
                                {"engine": "ray", "ray_num_cpus": 0}, {"engine": "ray", "ray_num_cpus": -1},
                                {"engine": "ray", "ray_num_gpus": -1}])
def test_caps_and_ray_resources_are_validated(head, tmp_path, kw):
    from clipheads.serving.scoring import UsageError
    from clipheads.serving.scoring.job import validate

    with pytest.raises(UsageError, match="must be"):
        validate(_job(head, tmp_path, tmp_path / "out.parquet", **kw))
    validate(_job(head, tmp_path, tmp_path / "out.parquet", max_bytes=1, max_pixels=1, ray_num_cpus=0.5))


# ---- 8. task order -----------------------------------------------------------------------------
def test_task_order_is_the_sources_and_part_of_the_identity(head, tmp_path):
    from clipheads.serving.scoring.shards import OutputConflict

    inp = _images(tmp_path / "in", 4)
    out = tmp_path / "out.parquet"
    _score(head, inp, out, shard_size=2, tasks=("shape", "color"))
    _png(inp / "img8.png", 8)  # a new shard at the end
    _png(inp / "img9.png", 9)
    s = _score(head, inp, out, shard_size=2, tasks=("color", "shape"))  # the same job
    assert (s.skipped, s.scored) == (4, 2)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    schemas = {pq.read_schema(p).remove_metadata() for p in parts}
    assert len(schemas) == 1  # one schema for the whole dataset
    assert [f.name for f in schemas.pop().field("predictions").type] == ["color", "shape"]  # the head's order
    assert len(pq.read_table(out)) == 6

    m = json.loads((out / "_manifest.json").read_text())  # an output written in another order
    m["job"]["tasks"] = dict(reversed(list(m["job"]["tasks"].items())))
    (out / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(OutputConflict, match="different job.*tasks"):
        _score(head, inp, out, shard_size=2)


# ---- 9. where a CSV stops being UTF-8 ----------------------------------------------------------
def test_a_csv_that_is_not_utf8_says_where(tmp_path):
    from clipheads.serving.scoring.listing import InputError, InputListing

    rows = [f"dir/img{i:05d}.png\n".encode() for i in range(20000)]
    rows[14999] = b"dir/caf\xe9.png\n"  # line 15001 of the file (after the header)
    data = b"path\n" + b"".join(rows)
    (tmp_path / "l.csv").write_bytes(data)
    with pytest.raises(InputError) as e:
        InputListing(tmp_path / "l.csv").count()
    at = data.index(b"\xe9")
    assert f"line 15001, byte offset {at}" in str(e.value)

    (tmp_path / "h.csv").write_bytes(b"pa\xffth\n" + b"".join(rows[:10]))  # in the header
    with pytest.raises(InputError, match="line 1, byte offset 2"):
        InputListing(tmp_path / "h.csv")
    (tmp_path / "t.csv").write_bytes(b"path\n" + b"".join(rows[:10]) + b"end\xe2\x82")  # cut at the end
    with pytest.raises(InputError, match=f"line 12, byte offset {5 + sum(map(len, rows[:10])) + 3}"):
        InputListing(tmp_path / "t.csv").count()


# ---- Pillow's decompression-bomb guard ---------------------------------------------------------
def test_above_pillows_bomb_limit_is_image_too_large():
    from PIL import Image

    from clipheads.serving.images import DecodeSpec, ImageRejected, decode_image, probe_image

    limit = Image.MAX_IMAGE_PIXELS
    spec = DecodeSpec(image_size=32)
    for fn in (decode_image, probe_image):
        with pytest.raises(ImageRejected) as e:
            fn(_png_header_only(20000, 20000), spec)  # 400 MP: Pillow's DecompressionBombError
        assert e.value.kind == "image_too_large" and "20000x20000" in e.value.detail
    with warnings.catch_warnings():  # 100 MP: Pillow's warning, an error under -W error
        warnings.simplefilter("error")
        with pytest.raises(ImageRejected) as e:
            decode_image(_png_header_only(10000, 10000), spec)
    assert e.value.kind == "image_too_large" and "10000x10000" in e.value.detail
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's guard stays on for everyone else
    with pytest.raises(Image.DecompressionBombError):
        Image.open(__import__("io").BytesIO(_png_header_only(20000, 20000)))
