"""The Python API (issue 15.2): import-light, the CLI's own objects, the offline example runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _register_test_configs, make_backbone

REPO = Path(__file__).resolve().parents[1]


def test_import_is_light_and_names_resolve_lazily():
    code = ("import sys, clipheads; assert 'torch' not in sys.modules, 'import clipheads pulled in torch'; "
            "print(clipheads.train.__module__, clipheads.Predictor.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["clipheads.training.fit", "Predictor"]


def test_public_names_are_the_cli_functions():
    import clipheads
    from clipheads.training import artifact, cli, fit

    assert clipheads.train is fit.train and clipheads.evaluate is fit.evaluate
    assert clipheads.load_head is fit.open_head and clipheads.save_head is artifact.save_head
    assert "fit import train" in Path(cli.__file__).read_text()  # `clipheads train` calls it
    for name in clipheads.__all__:
        obj = getattr(clipheads, name)
        assert name == "__version__" or obj.__doc__, f"clipheads.{name} has no docstring"
    with pytest.raises(AttributeError):
        clipheads.nope  # noqa: B018


def micro_backbone_from_file(d: Path):
    """The tiny test ViT with its random weights in a local checkpoint, so a reload rebuilds it."""
    from safetensors.torch import save_file

    from clipheads.training.backbone import load_backbone

    _register_test_configs()
    ckpt = d / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in make_backbone("test-vit-micro", seed=3).model.state_dict().items()},
              str(ckpt))
    return load_backbone("test-vit-micro", str(ckpt))


def _head_and_image(tmp_path):
    from clipheads.training.artifact import save_head
    from clipheads.training.methods import TaskSpec, build_method

    bb = micro_backbone_from_file(tmp_path)
    head = build_method("coop", bb, (TaskSpec("color", ("red", "green", "blue", "yellow")),), {"n_ctx": 2})
    img = Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8))
    img.save(tmp_path / "x.png")
    return head, save_head(head, tmp_path / "c.head.safetensors"), tmp_path / "x.png"


def test_predictor_on_a_head_object_file_and_bundle_agree(tmp_path):
    import clipheads

    head, path, image = _head_and_image(tmp_path)
    result = clipheads.export_bundle(path, tmp_path / "bundle", probes=4)
    assert result.passed
    with clipheads.Predictor(head, device="cpu") as live, clipheads.Predictor(path, device="cpu") as from_file, \
            clipheads.Predictor(result.bundle) as bundle:
        assert bundle.runtime_name == "onnx-cpu" and from_file.runtime_name == "torch-cpu"
        assert live.tasks == {"color": ["red", "green", "blue", "yellow"]}
        a = live.predict(image, top_k=4)
        b = from_file.predict([image, Image.open(image)], top_k=4)
        c = bundle.predict(np.asarray(Image.open(image)), tasks=["color"], top_k=4)
        for other in (b[0], b[1], c):  # same pixels, same ranking; scores equal up to float noise
            assert [r["label"] for r in a["color"]] == [r["label"] for r in other["color"]]
            assert np.allclose([r["score"] for r in a["color"]], [r["score"] for r in other["color"]], atol=1e-4)
        assert all(r["score"] == round(r["score"], 6) for r in c["color"])  # rounded as POST /classify's are
        zs = bundle.zero_shot([image, image], ["a red thing", "a blue thing"], top_k=1)
        assert len(zs) == 2 and zs[0] == zs[1] and zs[0][0]["label"] in ("a red thing", "a blue thing")
        for bad in (["no placeholder"], ["{0} {1}"], ["{!r}"]):  # what POST /zero_shot answers 422 to
            with pytest.raises(ValueError, match="template"):
                bundle.zero_shot(image, ["a", "b"], templates=bad)
        with pytest.raises(ValueError, match="unknown task"):
            bundle.predict(image, tasks=["nope"])
        big = tmp_path / "big.jpg"  # a JPEG large enough for draft decoding: the caller's object stays whole
        Image.fromarray((np.random.default_rng(1).random((800, 1000, 3)) * 255).astype(np.uint8)).save(big)
        mine = Image.open(big)
        by_object, by_path = bundle.predict(mine, top_k=4), bundle.predict(big, top_k=4)
        assert mine.size == (1000, 800) and by_object == by_path
        with pytest.raises(ValueError, match="image 0"):
            bundle.predict(b"not an image")
        import struct
        import zlib

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))  # 200 MP header, over Pillow's limit
        with pytest.raises(ValueError, match="image 0: ImageTooLarge"):
            bundle.predict(bomb)


@pytest.mark.integration
def test_example_script_runs_offline(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parity passed" in out.stdout and "defaults from recipe synth_coop_base2novel" in out.stdout
    assert "'split': 'test'" in out.stdout and "zero-shot:" in out.stdout
    assert "\r" not in out.stdout + out.stderr  # not a terminal: no progress-bar frames
    assert json.loads(json.dumps(out.stdout))  # printable
