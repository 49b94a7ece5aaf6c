"""Heads in BentoML's local model store: save, list (ours and `bentoml models list`), serve by tag.

Each step is a real subprocess with its own BENTOML_HOME (BentoML fixes its store at import)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_serving import REPO, make_micro_head

pytestmark = pytest.mark.integration
pytest.importorskip("bentoml")


def run(args, home: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(REPO),
               CLIPHEADS_MODEL_CONFIGS=str(REPO / "tests" / "model_configs"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_save_list_and_serve_a_head_by_tag(tmp_path):
    head = make_micro_head(tmp_path)
    home = tmp_path / "bentoml"
    saved = run(["-m", "clipheads", "models", "save", str(head), "--name", "micro-zs"], home)
    assert saved.returncode == 0, saved.stderr
    tag = saved.stdout.strip().splitlines()[-1]
    assert tag.startswith("micro-zs:")
    stored = next(home.glob("models/micro-zs/*/model.head.safetensors"))
    assert stored.read_bytes() == head.read_bytes()
    from clipheads.training.files import default_mode  # the entry directory too, not BentoML's 0700

    assert oct(stored.parent.stat().st_mode & 0o777) == oct(default_mode(is_dir=True))

    ours = run(["-m", "clipheads", "models", "list"], home)
    assert tag in ours.stdout and "head" in ours.stdout and "color" in ours.stdout
    theirs = run(["-m", "bentoml", "models", "list"], home)
    assert theirs.returncode == 0 and "micro-zs" in theirs.stdout

    for ref in (tag, "micro-zs", "micro-zs:latest"):
        dry = run(["-m", "clipheads", "serve", ref, "--dry-run"], home)
        assert dry.returncode == 0, dry.stderr
        assert f"CLIPHEADS_SOURCE={stored.resolve()}" in dry.stdout

    images = tmp_path / "images"  # batch scoring takes the same tag
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 20, 20)).save(images / "red.png")
    scored = run(["-m", "clipheads", "score", "micro-zs", "--input", str(images), "--output",
                  str(tmp_path / "preds"), "--runtime", "torch", "--json"], home)
    assert scored.returncode == 0, scored.stderr
    import json

    assert json.loads(scored.stdout)["scored"] == 1
    manifest = json.loads((tmp_path / "preds" / "_manifest.json").read_text())
    assert manifest["job"]["source"] == str(stored.resolve())
    missing = run(["-m", "clipheads", "score", "nosuch:v1", "--input", str(images), "--output",
                   str(tmp_path / "p2")], home)
    assert missing.returncode == 2 and "not a model in the BentoML store" in missing.stderr


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


def _predict_script(ref: str) -> str:
    return ("import json, sys\nfrom PIL import Image\nfrom clipheads import Predictor\n"
            f"p = Predictor({ref!r}, runtime='torch')\n"
            "print(json.dumps({'weights': p.runtime.backbone_weights,"
            " 'pred': p.predict(Image.new('RGB', (40, 40), (200, 20, 20)), top_k=7)}))\n")


def test_save_with_weights_then_the_checkpoint_is_gone(tmp_path):
    """Issue 15.4: a head trained on a local checkpoint is saved WITH its backbone weights by
    default (sha256 recorded); after the original checkpoint is deleted, the Predictor, `serve
    --dry-run` and a real `clipheads serve TAG` over HTTP still answer as before. `--no-weights`
    warns and the entry then cannot be served once the file is gone."""
    import json

    import httpx

    from clipheads.serving.runtimes import TorchRuntime
    from clipheads.training.files import file_sha256
    from test_serving import Server, expected, png

    head = make_micro_head(tmp_path)
    ckpt = tmp_path / "micro.safetensors"
    sha = file_sha256(ckpt)
    eager = TorchRuntime(head, device="cpu")
    want = {t: expected(eager, png(), t) for t in ("color", "shape")}
    home = tmp_path / "bentoml"
    saved = run(["-m", "clipheads", "models", "save", str(head), "--name", "micro", "--json"], home)
    assert saved.returncode == 0, saved.stderr
    res = json.loads(saved.stdout)
    assert res["kind"] == "head" and res["warnings"] == [] and "warning" not in saved.stderr
    assert res["weights"]["sha256"] == sha and res["weights"]["pretrained"] == str(ckpt)
    entry = next(p for p in home.glob("models/micro/*") if p.is_dir() and p.name != "latest")
    assert file_sha256(entry / res["weights"]["file"]) == sha
    assert (entry / "model.head.safetensors").read_bytes() == head.read_bytes()  # the head itself unchanged
    bare = run(["-m", "clipheads", "models", "save", str(head), "--name", "micro-bare", "--no-weights"], home)
    assert bare.returncode == 0 and f"warning: the entry does not hold the backbone weights: it points at {ckpt}" in bare.stderr
    listed = json.loads(run(["-m", "clipheads", "models", "list", "--json"], home).stdout)
    assert {r["tag"].split(":")[0]: r.get("backbone_weights") for r in listed} == {
        "micro": res["weights"]["file"], "micro-bare": None}

    ckpt.unlink()  # the checkpoint is gone (moved machines, cleaned up)
    assert run(["-m", "clipheads", "serve", "micro-bare", "--dry-run"], home).returncode == 2
    dry = run(["-m", "clipheads", "serve", "micro", "--dry-run"], home)
    assert dry.returncode == 0, dry.stderr
    pred = run(["-c", _predict_script("micro")], home)
    assert pred.returncode == 0, pred.stderr
    out = json.loads(pred.stdout)
    assert str(entry / res["weights"]["file"]) in out["weights"]
    for task in ("color", "shape"):
        assert [(r["label"], round(r["score"], 5)) for r in out["pred"][task]] == [
            (label, round(p, 5)) for label, p in want[task]]
    srv = Server(res["tag"], None, tmp_path / "server.log", env_extra={"BENTOML_HOME": str(home)})
    try:
        r = httpx.post(srv.url + "/classify", files=[("images", ("a.png", png(), "image/png"))],
                       data={"top_k": "7"}, timeout=30)
        assert r.status_code == 200, r.text
        for task in ("color", "shape"):
            got = [(x["label"], x["score"]) for x in r.json()["predictions"][0][task]]
            assert [g[0] for g in got] == [w[0] for w in want[task]]
            assert max(abs(g[1] - w[1]) for g, w in zip(got, want[task])) < 2e-6
    finally:
        srv.stop()


def test_a_built_bento_carries_the_model(tmp_path, clipheads_wheel):
    """`clipheads models bentofile TAG` (what `make bento MODEL=TAG` runs) + `bentoml build`: the
    Bento lists the model under `models:` and names it in CLIPHEADS_SOURCE, and `bentoml export`
    of it carries the entry's files (head and stored backbone weights) and the clipheads wheel."""
    import json

    import yaml

    head = make_micro_head(tmp_path)
    home = tmp_path / "bentoml"
    saved = run(["-m", "clipheads", "models", "save", str(head), "--name", "micro", "--json"], home)
    tag = json.loads(saved.stdout)["tag"]
    ctx = tmp_path / "ctx"  # a build context like the repository's after `make bento`: ./dist/<wheel>
    (ctx / "dist").mkdir(parents=True)
    shutil.copy2(clipheads_wheel, ctx / "dist" / clipheads_wheel.name)  # `pip wheel` of REPO (conftest)
    bf = ctx / "bentofile.yaml"
    made = run(["-m", "clipheads", "models", "bentofile", "micro", "--out", str(bf), "--json"], home)
    assert made.returncode == 0, made.stderr
    cfg = yaml.safe_load(bf.read_text())
    assert cfg["models"] == [tag] and {"name": "CLIPHEADS_SOURCE", "value": tag} in cfg["envs"]
    base = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert {k: v for k, v in cfg.items() if k != "models" and k != "envs"} == {
        k: v for k, v in base.items() if k != "envs"}
    assert all((ctx / w).is_file() for w in cfg["python"]["wheels"])
    built = run(["-m", "bentoml", "build", "-f", str(bf), str(ctx), "--output", "tag"], home, cwd=ctx)
    assert built.returncode == 0, built.stdout + built.stderr
    (bento_dir,) = [p for p in home.glob("bentos/*/*") if p.is_dir() and p.name != "latest"]
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for m in info["models"]] == [tag]
    exported = tmp_path / "clipheads.bento"  # what moves to another machine / goes into the image
    assert run(["-m", "bentoml", "export", "clipheads:latest", str(exported)], home).returncode == 0
    import tarfile

    version = tag.split(":")[1]
    with tarfile.open(exported) as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {f"models/micro/{version}/model.head.safetensors", f"models/micro/{version}/backbone.json",
            f"models/micro/{version}/backbone/micro.safetensors"} <= names
    assert any(n.startswith("env/python/wheels/clipheads-") for n in names)
