"""Shared fixtures: real open_clip models built from tiny configs with random weights."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

TEST_CONFIGS = Path(__file__).parent / "model_configs"


def _register_test_configs() -> None:
    import open_clip

    if "test-vit-micro" not in open_clip.list_models():
        open_clip.add_model_config(TEST_CONFIGS)


def make_backbone(arch: str, seed: int = 0):
    """A frozen Backbone of `arch` with random weights (seeded)."""
    import open_clip
    import torch

    from clipheads.training.backbone import Backbone

    _register_test_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    return Backbone(model, open_clip.get_tokenizer(arch), arch=arch, pretrained="none")


@pytest.fixture(scope="session")
def micro_backbone():
    """3-block ViT + 3-block text tower, 32 px: the fastest real CLIP."""
    return make_backbone("test-vit-micro")


@pytest.fixture(scope="session")
def micro_zeroshot_graph(micro_backbone, tmp_path_factory) -> Path:
    """The fp32 image graph (plain export, no fused attention) of a 4-class zero-shot head on the
    micro backbone: what the int8 tests quantize. Read-only: tests write their graphs elsewhere."""
    import torch

    from clipheads.export.fold import fold_heads
    from clipheads.export.onnx_export import export_image_graph
    from clipheads.training.methods import TaskSpec, build_method

    torch.manual_seed(0)
    tasks = (TaskSpec("shapes", ("circle", "square", "triangle", "star")),)
    enc = fold_heads([build_method("zeroshot", micro_backbone, tasks)]).graphs[0].encoder
    return export_image_graph(enc, tmp_path_factory.mktemp("micro_zeroshot") / "fp32.onnx")


@pytest.fixture(scope="session")
def rn_backbone():
    """A ModifiedResNet image tower: prompt methods that need a ViT must refuse it."""
    return make_backbone("test-rn-micro")


@pytest.fixture(scope="session")
def vitb16_backbone():
    """Real-size ViT-B/16 with random weights: parameter counts are checked on it."""
    return make_backbone("ViT-B-16")


@pytest.fixture(scope="session")
def openai_vitb16(tmp_path_factory):
    """Full-size random-init OpenAI-format ViT-B/16 weights (fp16 safetensors file) and OpenAI's own
    CLIP features on fixed probes (tests/reference_clip.py); shared by the reference-CLIP tests."""
    from reference_clip import openai_case

    return openai_case("ViT-B-16", tmp_path_factory.mktemp("openai_vitb16"))


@pytest.fixture(scope="session")
def clipheads_wheel(tmp_path_factory) -> Path:
    """The repository's clipheads wheel (`pip wheel --no-deps --no-build-isolation`, as `make bento`
    does), built once per test run: the packaging test and the Bento test read it. pytest-xdist
    workers have sessions of their own; two builds at once in the repository's build/ collide, so
    the first worker builds under a lock in the directory all workers share and the others reuse it."""
    import fcntl
    import os
    import subprocess
    import sys

    base = tmp_path_factory.getbasetemp()  # under xdist: RUN/popen-gwN; RUN is this run's, shared by workers
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "clipheads-wheel"
    with open(shared / "clipheads-wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not list(out.glob("clipheads-*.whl")):
            out.mkdir(exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(Path(__file__).resolve().parents[1])], check=True, cwd=out, timeout=300)
    (wheel,) = out.glob("clipheads-*.whl")
    return wheel


@pytest.fixture(scope="module")
def monkeypatch_module():
    """CLIPHEADS_MODEL_CONFIGS pointing at the test configs for a whole module (child processes and
    runtimes that register open_clip configs themselves read it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CLIPHEADS_MODEL_CONFIGS", str(TEST_CONFIGS))
    yield mp
    mp.undo()


@pytest.fixture
def no_work(monkeypatch):
    """Export's bad input must be found before the heads (and their backbone) are loaded or folded."""
    from clipheads.export import heads as export_heads_module
    from clipheads.export import pipeline

    def refuse(*a, **k):
        raise AssertionError("the export started before its options and --out were checked")

    monkeypatch.setattr(export_heads_module, "load_heads", refuse)
    monkeypatch.setattr(pipeline, "fold_heads", refuse)
