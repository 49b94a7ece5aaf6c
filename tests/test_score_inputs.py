"""Batch scoring input safety and time-based commits (`clipheads score`), on a real head.

- links leaving the input directory are listed as `outside_input`, never opened (a link to
  /etc/passwd, a link to an image elsewhere), unless `--follow-symlinks`;
- a directory named like an image, a FIFO and a link loop are listed or ended, never silent;
- inside one large shard, work is committed every `--commit-every` seconds: SIGKILL after the
  first commit, resume, every row exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")

from conftest import TEST_CONFIGS  # noqa: E402
from test_serving import make_micro_head  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def head(tmp_path_factory, monkeypatch_module):
    return make_micro_head(tmp_path_factory.mktemp("head"))


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """input/ with 3 images, a link to /etc/passwd, a link to an image outside input/, a link to
    an image inside, a directory named x.png, a FIFO and a link loop."""
    inp, outside = tmp_path / "input", tmp_path / "elsewhere"
    inp.mkdir()
    outside.mkdir()
    for i in range(3):
        _png(inp / f"img{i}.png", i)
    _png(outside / "secret.png", 9)
    (inp / "passwd.png").symlink_to("/etc/passwd")
    (inp / "elsewhere.png").symlink_to(outside / "secret.png")
    (inp / "again.png").symlink_to(inp / "img0.png")
    (inp / "x.png").mkdir()
    os.mkfifo(inp / "pipe.png")
    (inp / "sub").mkdir()
    _png(inp / "sub" / "deep.png", 5)
    (inp / "sub" / "loop").symlink_to(inp)  # a link back up: entered once, then the walk stops
    return inp


def _score(head, inp, out, **kw):
    from clipheads.serving.scoring import ScoreJob, score

    return score(ScoreJob(source=str(head), input=str(inp), output=str(out), progress=False, top_k=1, **kw))


def _errors(out: Path) -> dict[str, str]:
    return {e["path"]: e["kind"] for e in map(json.loads, (out / "_errors.jsonl").read_text().splitlines())}


def test_links_out_of_the_input_are_listed_not_followed(head, tree, tmp_path):
    out = tmp_path / "out.parquet"
    s = _score(head, tree, out)
    rows = set(pq.read_table(out).column("path").to_pylist())
    assert rows == {"img0.png", "img1.png", "img2.png", "again.png", "sub/deep.png"}
    assert _errors(out) == {"passwd.png": "outside_input", "elsewhere.png": "outside_input",
                            "x.png": "not_a_file", "pipe.png": "not_a_file"}
    assert (s.scored, s.failed, s.total) == (5, 4, 9)


def test_follow_symlinks_opts_in(head, tree, tmp_path):
    out = tmp_path / "out.parquet"
    _score(head, tree, out, follow_symlinks=True)
    rows = set(pq.read_table(out).column("path").to_pylist())
    assert "elsewhere.png" in rows  # the image outside is scored now
    errs = _errors(out)
    assert errs["passwd.png"] == "unsupported_format"  # opened, and refused by its bytes
    assert errs["x.png"] == errs["pipe.png"] == "not_a_file"
    # resuming with the other setting is another job (the errors differ): refused, nothing lost
    from clipheads.serving.scoring.shards import OutputConflict

    with pytest.raises(OutputConflict, match="input"):
        _score(head, tree, out)


def test_commit_by_time_inside_one_shard_then_sigkill_and_resume(head, tmp_path):
    """4,000 inputs in one default-size shard (4,096): before time-based commits nothing was
    committed until the end, so a kill lost everything."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(40):
        _png(imgs / f"{i:03d}.png", i)
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"{imgs}/{i % 40:03d}.png\n" for i in range(4000)))
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "clipheads.cli", "score", str(head), "--input", str(listing), "--output", str(out),
           "--top-k", "1", "--batch-size", "16", "--workers", "1", "--commit-every", "0.5", "--no-progress"]
    env = {**os.environ, "CLIPHEADS_MODEL_CONFIGS": str(TEST_CONFIGS), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "_manifest.json"
    deadline, parts = time.monotonic() + 120, {}
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file():
            parts = json.loads(manifest.read_text())["shards"]
            if parts:
                break
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert alive and parts, "nothing was committed while the job ran"
    m = json.loads(manifest.read_text())
    assert not m["complete"] and {p["shard"] for p in m["shards"].values()} == {0}
    done = sum(p["stop"] - p["start"] for p in m["shards"].values())
    assert 0 < done < 4000

    res = subprocess.run(cmd + ["--json"], cwd=REPO, env=env, capture_output=True, timeout=300)  # resume
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    s = json.loads(res.stdout)
    assert (s["skipped"], s["scored"], s["rows_total"]) == (done, 4000 - done, 4000)
    idx = pq.read_table(out).column("index").to_pylist()
    assert sorted(idx) == list(range(4000))  # exactly one row per input
    final = json.loads(manifest.read_text())["shards"]
    starts = sorted((p["start"], p["stop"]) for p in final.values())
    assert starts[0][0] == 0 and starts[-1][1] == 4000
    assert all(a[1] == b[0] for a, b in zip(starts, starts[1:]))  # pieces tile the shard
