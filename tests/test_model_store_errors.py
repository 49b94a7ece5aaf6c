"""`clipheads models save/bentofile` on bad input: exit 2 and one `clipheads models CMD: error:`
line, never a traceback; weights that moved, stored so open_clip loads them; entry directories
that follow the umask.

Each step is a real subprocess with its own BENTOML_HOME (BentoML fixes its store at import)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from test_serving import REPO, make_micro_head

pytestmark = pytest.mark.integration
pytest.importorskip("bentoml")


def run(args, home: Path, umask: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO), CLIPHEADS_MODEL_CONFIGS=str(REPO / "tests" / "model_configs"))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          umask=-1 if umask is None else umask)


def models(*args, home: Path, umask: int | None = None) -> subprocess.CompletedProcess:
    return run(["-m", "clipheads", "models", *map(str, args)], home, umask)


def refused(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a command refused as bad input (exit 2), without its prefix."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), \
        (proc.returncode, proc.stderr)
    return lines[0][len(f"{prog}: error: "):]


def entry_dir(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version


@pytest.fixture
def head(tmp_path) -> Path:
    return make_micro_head(tmp_path)  # records tmp_path/micro.safetensors, its local weights file


def test_moved_weights_are_refused_then_stored_under_a_safetensors_name(head, tmp_path):
    """Bugs 1 and 2: the recorded checkpoint moved -> exit 2 naming it and --pretrained FILE; with
    --pretrained pointing at the moved file (safetensors bytes, another extension) the entry stores
    it as `*.safetensors`, and a Predictor opened on the tag loads it (open_clip picks its loader by
    the extension: torch.load on safetensors bytes was an UnpicklingError)."""
    home = tmp_path / "bentoml"
    ckpt = tmp_path / "micro.safetensors"
    moved = ckpt.rename(tmp_path / "micro.weights")
    msg = refused(models("save", head, "--name", "moved", home=home), "clipheads models save")
    assert str(ckpt) in msg and "gone" in msg and "--pretrained FILE" in msg
    assert not (home / "models" / "moved").exists()

    saved = models("save", head, "--name", "moved", "--pretrained", moved, "--json", home=home)
    assert saved.returncode == 0, saved.stderr
    res = json.loads(saved.stdout)
    assert res["weights"]["file"] == "backbone/micro.weights.safetensors"
    stored = entry_dir(home, res["tag"]) / res["weights"]["file"]
    assert stored.read_bytes() == moved.read_bytes()
    moved.unlink()  # only the entry's copy is left
    pred = run(["-c", "from PIL import Image\nfrom clipheads import Predictor\n"
                "p = Predictor('moved', runtime='torch')\nprint(p.runtime.backbone_weights)\n"
                "print(sorted(p.predict(Image.new('RGB', (40, 40), (200, 20, 20)), top_k=1)))\n"], home)
    assert pred.returncode == 0, pred.stderr
    assert str(stored) in pred.stdout and "['color', 'shape']" in pred.stdout


def test_bad_names_taken_versions_and_unwritable_out_are_refused(head, tmp_path):
    """Bug 4: an invalid tag, `:latest` and a version saved twice are refused before anything is
    copied (the store is left as it was); `bentofile --out` into a missing directory likewise."""
    home = tmp_path / "bentoml"
    msg = refused(models("save", head, "--name", "My Pets", home=home), "clipheads models save")
    assert "'My Pets' is not a valid model name" in msg
    assert "a tag's name or version must consist of lowercase" in msg
    assert "not a valid model name" in refused(models("save", head, "--name", "a:b:c", home=home),
                                               "clipheads models save")
    assert "'latest'" in refused(models("save", head, "--name", "pets:latest", home=home), "clipheads models save")
    assert not (home / "models" / "pets").exists()  # was a directory named `latest`, then a crash

    first = models("save", head, "--name", "pets:v1", "--no-weights", home=home)
    assert first.returncode == 0 and first.stdout.strip() == "pets:v1", first.stderr
    before = sorted(p.relative_to(home).as_posix() for p in home.rglob("*"))
    again = models("save", head, "--name", "Pets:v1", "--json", home=home)
    msg = refused(again, "clipheads models save")
    assert "pets:v1 already exists in the model store" in msg and "bentoml models delete pets:v1" in msg
    assert json.loads(again.stdout) == {"ok": False, "exit_code": 2, "error": msg}
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == before

    out = tmp_path / "nonexistent" / "dir" / "x.yaml"
    msg = refused(models("bentofile", "pets:v1", "--out", out, home=home), "clipheads models bentofile")
    assert msg == f"--out {out}: cannot write it (No such file or directory)"
    made = models("bentofile", "pets:v1", "--out", tmp_path / "x.yaml", home=home)
    assert made.returncode == 0 and "CLIPHEADS_SOURCE" in (tmp_path / "x.yaml").read_text(), made.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_entry_directories_follow_the_umask(head, tmp_path, mask):
    """Bug 3: BentoML creates the entry directory 0700 (tempfile.mkdtemp); every directory of the
    entry gets the umask's mode like its files, so another user (a container's) can read it."""
    home = tmp_path / "bentoml"
    saved = models("save", head, "--name", "modes", "--json", home=home, umask=mask)
    assert saved.returncode == 0, saved.stderr
    entry = entry_dir(home, json.loads(saved.stdout)["tag"])
    assert (entry / "backbone").is_dir()
    got = {p.relative_to(entry).as_posix() or ".": oct(stat.S_IMODE(p.stat().st_mode)) for p in [entry, *entry.rglob("*")]}
    want = {k: oct((0o777 if (entry / k).is_dir() else 0o666) & ~mask) for k in got}
    assert got == want


def test_a_stored_head_or_bundle_that_changed_is_refused_by_tag(head, tmp_path):
    """The entry records its head's sha256 (a bundle's manifest's) at save: a tampered copy is
    refused when the tag is resolved (serve, score, Predictor), not served with edited labels."""
    home = tmp_path / "bentoml"
    saved = models("save", head, "--name", "zs", "--json", home=home)
    assert saved.returncode == 0, saved.stderr
    tag = json.loads(saved.stdout)["tag"]
    stored = entry_dir(home, tag) / "model.head.safetensors"
    ok = run(["-m", "clipheads", "serve", tag, "--dry-run"], home)
    assert ok.returncode == 0, ok.stderr
    data = stored.read_bytes()
    assert b'\\"red\\"' in data  # in the header's JSON (itself a JSON string: escaped quotes)
    stored.write_bytes(data.replace(b'\\"red\\"', b'\\"RED\\"', 1))  # same length: still a valid file
    msg = refused(run(["-m", "clipheads", "serve", tag, "--dry-run"], home), "clipheads serve")
    assert "changed since it was saved" in msg


def test_no_weights_with_pretrained_or_with_the_weights_gone_is_refused(head, tmp_path):
    home = tmp_path / "bentoml"
    msg = refused(models("save", head, "--no-weights", "--pretrained", tmp_path / "micro.safetensors", home=home),
                  "clipheads models save")
    assert "--no-weights" in msg
    (tmp_path / "micro.safetensors").unlink()
    msg = refused(models("save", head, "--no-weights", home=home), "clipheads models save")
    assert "gone" in msg and "could not be served anywhere" in msg
