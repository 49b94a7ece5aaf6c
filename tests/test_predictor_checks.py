"""Predictor (review of issue 15.2's API): an in-memory head runs on its own backbone, and requests
are checked as `POST /classify` and `POST /zero_shot` check them (ValueError, not a wrong answer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _register_test_configs


@pytest.fixture(scope="module")
def random_head():
    """A zero-shot head on a random-init backbone (pretrained='none'): its weights exist only in memory."""
    import clipheads
    from clipheads.training.methods import TaskSpec, build_method

    _register_test_configs()
    torch.manual_seed(0)
    bb = clipheads.load_backbone("test-vit-micro", "none", device="cpu")
    return build_method("zeroshot", bb, [TaskSpec("color", ("red", "green", "blue"))], {}).eval()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_an_in_memory_head_answers_with_its_own_backbone(random_head, image):
    import clipheads
    from clipheads.training.preprocess import normalize

    with clipheads.Predictor(random_head, device="auto") as p:  # "auto" is a device, as for train()
        assert p.runtime.head.backbone is random_head.backbone  # not rebuilt with other random weights
        x = torch.from_numpy(normalize(p.pixels(image), p.spec))
        with torch.no_grad():
            want = torch.softmax(random_head.logits(x, 0), -1)[0].numpy()
        got = {r["label"]: r["score"] for r in p.predict(image, top_k=3)["color"]}
        assert np.allclose([got[c] for c in ("red", "green", "blue")], want, atol=1e-5)
    with pytest.raises(Exception, match="runs eagerly on its own backbone"):
        clipheads.Predictor(random_head, runtime="torch-folded")


def test_a_bad_device_is_named_not_blamed_on_the_weights(random_head, tmp_path):
    import clipheads
    from clipheads.serving.runtimes import RuntimeError_

    path = clipheads.save_head(random_head, tmp_path / "h.head.safetensors")
    with pytest.raises(RuntimeError_, match="unknown device 'gpu0'"):
        clipheads.Predictor(path, device="gpu0")


def test_labels_tasks_and_empty_lists_are_checked_as_the_server_does(random_head, image):
    import clipheads

    with clipheads.Predictor(random_head) as p:
        for labels, match in ((["cat", "Cat"], "read the same"), (["red_car", "red car"], "read the same"),
                              ([" cat", "cat "], "read the same"), (["", "dog"], "non-empty strings"),
                              (["cat", 3], "non-empty strings"), ("cat", "not one string"), ([], "non-empty list")):
            with pytest.raises(ValueError, match=match):
                p.zero_shot(image, labels)
        with pytest.raises(ValueError, match="not one string"):
            p.zero_shot(image, ["cat", "dog"], templates="a {} photo")
        assert len(p.zero_shot(image, np.array(["a cat", "a dog"]), top_k=2)) == 2  # any iterable, as tasks
        ranked = p.zero_shot(image, [" a cat ", "a dog"], top_k=2)
        assert sorted(r["label"] for r in ranked) == ["a cat", "a dog"]  # stripped, as the server answers
        with pytest.raises(ValueError, match="not one string"):
            p.predict(image, tasks="color")
        with pytest.raises(ValueError, match="each once"):
            p.predict(image, tasks=["color", "color"])
        assert p.predict([]) == [] and p.zero_shot([], ["a cat", "a dog"]) == []
        assert p.embed([]).shape == (0, p.embed(image).shape[1])


def test_images_stream_in_batches_and_paths_expand_home(random_head, image, monkeypatch):
    import clipheads

    monkeypatch.setenv("HOME", str(image.parent))
    with clipheads.Predictor(random_head, batch_size=2) as p:
        seen = []
        run = p.runtime.run_path
        monkeypatch.setattr(p.runtime, "run_path", lambda path, px, *a, **k: seen.append(len(px)) or run(path, px, *a, **k))
        preds = p.predict(["~/x.png"] * 5, top_k=1)
        assert len(preds) == 5 and len({x["color"][0]["label"] for x in preds}) == 1
        assert seen == [2, 2, 1]
        with pytest.raises(ValueError, match="image 3:"):  # named by its place in the whole list
            p.predict([image, image, image, b"junk"])


def test_global_flags_go_before_a_double_dash(tmp_path, random_head, capsys):
    import json

    import clipheads
    from clipheads.cli import main

    path = clipheads.save_head(random_head, tmp_path / "h.head.safetensors")
    assert main(["--json", "info", "--", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)


def test_train_refuses_weights_flags_for_a_loaded_backbone(random_head):
    import clipheads

    with pytest.raises(TypeError, match="pretrained='x.safetensors'"):
        clipheads.train("zeroshot", [], backbone=random_head.backbone, pretrained="x.safetensors")
