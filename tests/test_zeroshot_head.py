"""Issue 14.4: plain CLIP zero-shot as a head - `clipheads train --method zeroshot` writes class names
and templates (no tensors), `clipheads export` bundles it, and a real ONNX Runtime session
classifies images of the synthetic world with it, as the eager zero-shot classifier does."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clipheads.training.data.synth import WorldSize, generate_world

    return generate_world(tmp_path_factory.mktemp("zs") / "world", seed=0, size=WorldSize(train=1, val=1, test=3),
                          workers=1)


def test_zeroshot_train_export_serve_in_onnxruntime(world, tmp_path, capsys):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clipheads.export.bundle import load_bundle
    from clipheads.export.cli import main as export_main
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.training.artifact import load_head
    from clipheads.training.cli import main as train_main
    from clipheads.training.data.synth import load_world_splits
    from clipheads.training.loop import evaluate

    photo = load_world_splits(world, "photo")
    head_path = tmp_path / "zs.head.safetensors"
    classes = "photo=" + ",".join(photo.classnames)
    assert train_main(["train", "--method", "zeroshot", "--classes", classes, "--set", 'templates=["a photo of a {}."]',
                       "--out", str(head_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_parameters"] == 0 and out["trained"] is False and out["epochs"] == 0
    art = load_head(head_path)
    assert art.tensors == {} and art.method == "zeroshot"
    assert art.tasks[0].classnames == photo.classnames
    assert art.method_config["templates"] == ["a photo of a {}."]

    bundle = tmp_path / "bundle"
    assert export_main([str(head_path), "--out", str(bundle), "--probes", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["passed"]
    m = load_bundle(bundle).manifest
    (task,) = m["tasks"]
    sess = ort.InferenceSession(str(bundle / task["graph"]), providers=["CPUExecutionProvider"])

    head = art.build()
    spec = DecodeSpec.from_preprocess(head.backbone.preprocess)
    samples = photo.test
    pixels = np.stack([decode_image(open(s.path, "rb").read(), spec) for s in samples])
    logits, _ = sess.run(["logits", "features"], {"pixels": pixels, "task_index": np.zeros(len(pixels), np.int64)})
    a, z = task["logit_slice"]
    served = logits[:, a:z].argmax(1)
    labels = np.array([s.label for s in samples])
    accuracy = float((served == labels).mean())
    eager = evaluate(head, samples)["top1"]
    assert accuracy == pytest.approx(eager, abs=1 / len(samples))  # the bundle classifies as the eager head
    assert accuracy > 0.5  # real zero-shot on the tiny CLIP's photo domain (32 classes, chance 3%)


def test_zeroshot_from_data_and_trained_methods_without_images_exit_2(world, tmp_path, capsys):
    from clipheads.training.artifact import load_head
    from clipheads.training.cli import main as train_main

    head_path = tmp_path / "zs-data.head.safetensors"
    split = str(world / "splits" / "sketch.json")
    assert train_main(["train", "--method", "zeroshot", "--data", split, "--out", str(head_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 < out["metrics"]["test_top1"]["sketch"] <= 1.0  # evaluated on the split's test images
    assert load_head(head_path).tasks[0].templates == ("a photo of a {}.",)  # the dataset's own template
    bad = str(tmp_path / "coop.head.safetensors")
    assert train_main(["train", "--method", "coop", "--classes", "t=cat,dog", "--out", bad]) == 2
    assert "training images" in capsys.readouterr().err
    assert train_main(["train", "--method", "zeroshot", "--classes", "t=cat", "--out", bad]) == 2
    assert "--classes expects" in capsys.readouterr().err


def test_a_template_ensemble_is_what_the_summary_and_the_manifest_report(tmp_path, capsys):
    """`--set templates=[...]` builds the class matrix from that ensemble: the train summary and the
    bundle manifest (which serving reads) name it, not the task's default template."""
    from clipheads.export.bundle import load_bundle
    from clipheads.export.cli import main as export_main
    from clipheads.training.cli import main as train_main

    ensemble = ["art of the {}.", "a sketch of a {}."]
    head_path = tmp_path / "zse.head.safetensors"
    assert train_main(["train", "--method", "zeroshot", "--classes", "pets=cat,dog,hamster",
                       "--set", f"templates={json.dumps(ensemble)}", "--out", str(head_path)]) == 0
    assert f"templates {ensemble}" in capsys.readouterr().out
    bundle = tmp_path / "bundle"
    assert export_main([str(head_path), "--out", str(bundle), "--probes", "8", "-q"]) == 0
    assert load_bundle(bundle).manifest["tasks"][0]["templates"] == ensemble
