"""Heads in BentoML's local model store: save, list (ours and `bentoml models list`), serve by tag.

Each step is a real subprocess with its own BENTOML_HOME (BentoML fixes its store at import)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_serving import REPO, make_micro_head

pytestmark = pytest.mark.integration
pytest.importorskip("bentoml")


def run(args, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_save_list_and_serve_a_head_by_tag(tmp_path):
    head = make_micro_head(tmp_path)
    home = tmp_path / "bentoml"
    saved = run(["-m", "clipheads", "models", "save", str(head), "--name", "micro-zs"], home)
    assert saved.returncode == 0, saved.stderr
    tag = saved.stdout.strip().splitlines()[-1]
    assert tag.startswith("micro-zs:")
    stored = next(home.glob("models/micro-zs/*/model.head.safetensors"))
    assert stored.read_bytes() == head.read_bytes()

    ours = run(["-m", "clipheads", "models", "list"], home)
    assert tag in ours.stdout and "head" in ours.stdout and "color" in ours.stdout
    theirs = run(["-m", "bentoml", "models", "list"], home)
    assert theirs.returncode == 0 and "micro-zs" in theirs.stdout

    for ref in (tag, "micro-zs", "micro-zs:latest"):
        dry = run(["-m", "clipheads", "serve", ref, "--dry-run"], home)
        assert dry.returncode == 0, dry.stderr
        assert f"CLIPHEADS_SOURCE={stored.resolve()}" in dry.stdout


def test_bad_sources_are_refused_with_exit_2(tmp_path):
    home = tmp_path / "bentoml"
    (tmp_path / "junk.txt").write_text("not a head")
    bad = run(["-m", "clipheads", "models", "save", str(tmp_path / "junk.txt")], home)
    assert bad.returncode == 2 and "not an export bundle" in bad.stderr
    fake = tmp_path / "fake.head.safetensors"
    fake.write_bytes(b"\x80\x04pickle")
    bad = run(["-m", "clipheads", "models", "save", str(fake)], home)
    assert bad.returncode == 2 and "fake.head.safetensors" in bad.stderr
    missing = run(["-m", "clipheads", "serve", "nosuch-model:v1", "--dry-run"], home)
    assert missing.returncode == 2 and "not a model in the BentoML store" in missing.stderr
