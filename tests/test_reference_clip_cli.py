"""Issue 14 must-show: the CLI path a user takes gives OpenAI's CLIP features.

`clipheads train --backbone ViT-B-16 --pretrained openai` with the weights available offline where
open_clip's `openai` tag looks for them (a Hugging Face cache the test fills with random-init
OpenAI-format weights, HF_HUB_OFFLINE=1), then `clipheads export`: the bundle's image and text
features equal OpenAI's CLIP code on the same weights (1 - cos <= 1e-6). The same for a local
safetensors file with QuickGELU stated (`--act quickgelu`); a GELU/QuickGELU mismatch exits 2.

Cost: the session's shared random ViT-B/16 (conftest `openai_vitb16`); 1-epoch CoOp heads on 4
images; each bundle exported once (4 parity probes). The tag path runs in a separate process with
the env a user sets (train and export in one process: one import and one cache load, ~10 s less);
the local-file path and the refusals run the same `main` in-process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_clip import keep_global_rng  # noqa: F401 (autouse)
from reference_clip import OPENAI_MEAN, OPENAI_STD, THRESHOLD, bundle_features, one_minus_cos

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = Path(__file__).resolve().parents[1]
HF_REPO = "timm/vit_base_patch16_clip_224.openai"  # where open_clip 3.3's ViT-B-16 `openai` tag points
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fill_hf_cache(hf_home: Path, weights: Path) -> Path:
    """The file layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""
    repo = hf_home / "hub" / f"models--{HF_REPO.replace('/', '--')}"
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    cached = snap / "open_clip_model.safetensors"
    shutil.copyfile(weights, cached)
    (snap / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 512, "quick_gelu": True,
                      "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}))
    return cached


@pytest.fixture(scope="module")
def world(tmp_path_factory, openai_vitb16):
    from conftest_data import write_images

    root = tmp_path_factory.mktemp("openai_cli")
    cached = _fill_hf_cache(root / "hf", openai_vitb16["weights"])
    data = root / "pets"
    for cls in ("cat", "dog"):
        write_images(data / cls, 2, ext="png")
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("HF_HUB_CACHE", None)
    return {**openai_vitb16, "root": root, "cached": cached, "data": data, "env": env}


def _clipheads(world, *args: str) -> subprocess.CompletedProcess:
    """A separate process, as a user runs it (its own HF_HOME and HF_HUB_OFFLINE=1)."""
    return subprocess.run([sys.executable, "-m", "clipheads", *args], capture_output=True, text=True, cwd=ROOT,
                          env=world["env"], timeout=900)


SESSION = """import sys
from clipheads.cli import main
for argv in {argvs!r}:
    print("@@ clipheads", *argv, file=sys.stderr, flush=True)
    code = main(argv)
    print("@@ exit", code, file=sys.stderr, flush=True)
    if code:
        sys.exit(code)
"""


def _clipheads_session(world, *argvs: list[str]) -> list[tuple[int, str]]:
    """Several commands in one separate process (the same `main` the entry point runs, the env a
    user sets): one torch/open_clip import and one ViT-B/16 load from the cache instead of one per
    command. -> [(exit code, that command's stderr)] for the commands that ran."""
    r = subprocess.run([sys.executable, "-c", SESSION.format(argvs=[list(a) for a in argvs])], capture_output=True,
                       text=True, cwd=ROOT, env=world["env"], timeout=900)
    out = []
    for chunk in r.stderr.split("@@ clipheads ")[1:]:
        body, _, tail = chunk.partition("@@ exit ")
        out.append((int(tail.split()[0]) if tail else r.returncode or -1, body))
    assert out, r.stderr[-3000:]
    return out


def _train_args(world, out: Path, *backbone: str) -> list[str]:
    return ["train", "--method", "coop", "--set", "n_ctx=4", "--data", str(world["data"]), "--epochs", "1",
            "--batch-size", "4", "--warmup-epochs", "0", "--no-eval", "--out", str(out), "--json", *backbone]


def _compare_bundle(world, bundle: Path, name: str) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    img, txt = bundle_features(bundle, world["pixels"].numpy(), world["tokens"].numpy())
    d = (one_minus_cos(torch.from_numpy(img), world["ref"][0]), one_minus_cos(torch.from_numpy(txt), world["ref"][1]))
    print(f"\n{name}: 1 - cos vs OpenAI CLIP image {d[0]:.1e}, text {d[1]:.1e}")
    assert max(d) <= THRESHOLD, d
    return manifest


def test_openai_tag_offline_exports_openai_features(world):
    from clipheads.training.files import file_sha256

    head, bundle = world["root"] / "tag.head.safetensors", world["root"] / "tag_bundle"
    (train, train_err), *rest = _clipheads_session(
        world, _train_args(world, head, "--backbone", "ViT-B-16", "--pretrained", "openai"),
        ["export", str(head), "--out", str(bundle), "--probes", "4", "--json"])
    assert train == 0, train_err[-3000:]
    assert "QuickGELU" in train_err and str(world["cached"]) in train_err  # says which file it used
    (export, export_err), = rest
    assert export == 0, export_err[-3000:]
    assert f"weights {world['cached']}" in export_err
    bb = _compare_bundle(world, bundle, "--pretrained openai")["backbone"]
    assert (bb["arch"], bb["pretrained"], bb["act"], bb["image_size"]) == ("ViT-B-16", "openai", "quickgelu", 224)
    assert bb["weights_sha256"] == file_sha256(world["cached"])


def test_models_save_a_tag_head_warns_or_stores_the_cached_weights(world, tmp_path):
    """Issue 15.4: a head on a downloadable tag is saved without its weights by default, with a
    warning; `--with-weights` copies the tag's file from the local Hugging Face cache (sha256 as
    the head records). On a machine with an empty cache only the entry with weights opens."""
    from clipheads.training.files import file_sha256

    head = world["root"] / "tag.head.safetensors"
    if not head.exists():  # written by the test above
        r = _clipheads(world, *_train_args(world, head, "--backbone", "ViT-B-16", "--pretrained", "openai"))
        assert r.returncode == 0, r.stderr[-3000:]
    world = {**world, "env": {**world["env"], "BENTOML_HOME": str(tmp_path / "bentoml")}}
    bare = _clipheads(world, "models", "save", str(head), "--name", "tag-bare", "--json")
    assert bare.returncode == 0, bare.stderr
    assert "warning: the entry does not hold the backbone weights" in bare.stderr and "--with-weights" in bare.stderr
    assert json.loads(bare.stdout)["weights"] is None
    full = _clipheads(world, "models", "save", str(head), "--name", "tag-full", "--with-weights", "--json")
    assert full.returncode == 0, full.stderr
    stored = json.loads(full.stdout)["weights"]
    assert stored["sha256"] == file_sha256(world["cached"]) and stored["pretrained"] == "openai"
    elsewhere = {**world["env"], "HF_HOME": str(tmp_path / "empty-hf")}  # another machine
    # one process for both entries (each would pay the torch/open_clip imports): the stored copy
    # opens and predicts, the bare entry's tag weights are not in the empty cache
    probe = ("from clipheads import Predictor; import numpy as np\n"
             "p = Predictor('tag-full', runtime='torch'); print(p.runtime.backbone_weights)\n"
             "print(p.predict(np.zeros((32, 32, 3), np.uint8), top_k=1))\n"
             "try:\n    Predictor('tag-bare', runtime='torch')\nexcept Exception as err:\n"
             "    print('bare refused:', type(err).__name__, err)\nelse:\n    print('bare opened')\n")
    ok = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=elsewhere,
                        timeout=900)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "tag-full" in ok.stdout and stored["file"] in ok.stdout  # the entry's own copy
    assert "bare refused:" in ok.stdout and "could not load weights 'openai'" in ok.stdout, ok.stdout[-2000:]


def test_local_file_with_quickgelu_stated_exports_openai_features(world, capsys):
    """In-process (the same `main` the entry point calls): no HF cache is involved."""
    from clipheads.export.cli import main as export_main
    from clipheads.training.cli import main

    local = world["weights"]  # a plain safetensors file: nothing in it says QuickGELU
    head, bundle = world["root"] / "local.head.safetensors", world["root"] / "local_bundle"
    # with no activation stated, a plain file on ViT-B-16 is refused: it could hold either kind
    assert main(_train_args(world, head, "--backbone", "ViT-B-16", "--pretrained", str(local))) == 2
    assert "--act quickgelu" in capsys.readouterr().err and not head.exists()
    assert main(_train_args(world, head, "--backbone", "ViT-B-16", "--pretrained", str(local), "--act", "quickgelu")) == 0
    assert export_main([str(head), "--out", str(bundle), "--probes", "4"]) == 0
    assert f"weights {local}" in capsys.readouterr().err
    bb = _compare_bundle(world, bundle, "local file + --act quickgelu")["backbone"]
    assert (bb["pretrained"], bb["act"]) == (str(local), "quickgelu")


def test_activation_mismatch_is_refused_with_the_fix(world, capsys):
    from clipheads.training.cli import main

    head = world["root"] / "never.head.safetensors"
    assert main(_train_args(world, head, "--backbone", "ViT-B-16", "--pretrained", "openai", "--act", "gelu")) == 2
    err = capsys.readouterr().err
    assert "activation mismatch" in err and "drop --act gelu" in err and not head.exists()
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6
