"""Issue 7's first must-show: correct labels over HTTP from a head *trained on the synthetic world*.

A 16-shot CoOp head is trained on the held-out domain (sketch) of a small synthetic world on the
packaged tiny CLIP (the demo's recipe, cut from 30 epochs to 6: +11 points over zero-shot already,
a fifth of the time), served by a real `clipheads serve`, and asked for every
test image of that domain: the served labels must be the eager head's labels, and right far above
chance (32 classes), as the trained head is.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from test_serving import Server

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import PACKAGED_ARCH, load_backbone
    from clipheads.training.data.fewshot import few_shot_splits
    from clipheads.training.data.synth import generate_world, load_world_splits
    from clipheads.training.loop import TrainConfig, evaluate, train_head
    from clipheads.training.methods import TaskSpec, build_method
    from clipheads.training.pretrain import HELD_OUT_DOMAIN
    from clipheads.training.protocols.recipes import load_recipe

    d = tmp_path_factory.mktemp("world")
    world = generate_world(d / "world", seed=0, size="small", domains=(HELD_OUT_DOMAIN,))  # the only one used
    split = load_world_splits(world, HELD_OUT_DOMAIN)
    backbone = load_backbone(PACKAGED_ARCH)
    task = [TaskSpec(HELD_OUT_DOMAIN, split.classnames, split.templates)]
    zero_shot = evaluate(build_method("zeroshot", backbone, task), split.test)["top1"]
    recipe = load_recipe("synth_coop_heldout")
    head = build_method("coop", backbone, task, recipe.method_config)
    train_head(head, {0: few_shot_splits(split, 16, 1).train}, TrainConfig(**{**recipe.train, "seed": 1, "epochs": 6}))
    tuned = evaluate(head, split.test)["top1"]
    path = save_head(head, d / "coop-sketch.head.safetensors")
    return {"dir": d, "head": path, "split": split, "zero_shot": zero_shot, "tuned": tuned}


def test_served_labels_of_a_head_trained_on_the_synthetic_world(trained):
    from clipheads.serving.images import DecodeSpec, decode_image
    from clipheads.serving.runtimes import open_runtime

    split = trained["split"]
    assert trained["tuned"] > trained["zero_shot"] + 0.05  # the head really learned something
    eager = open_runtime(trained["head"], "torch")
    spec = DecodeSpec.from_preprocess(eager.preprocess)
    samples = split.test
    blobs = [open(s.path, "rb").read() for s in samples]
    (name, logits), = eager.classify(np.stack([decode_image(b, spec) for b in blobs])).items()
    want = [eager.tasks[name].classnames[i] for i in logits.argmax(1)]

    d = trained["dir"]
    srv = Server(trained["head"], d / "tasks", d / "server.log")
    try:
        got = []
        for i in range(0, len(blobs), 16):  # 16 images per request, multipart
            files = [("images", (f"{k}.png", b, "image/png")) for k, b in enumerate(blobs[i:i + 16])]
            r = httpx.post(srv.url + "/classify", files=files, data={"top_k": "1"}, timeout=60)
            assert r.status_code == 200, r.text
            got += [p[name][0]["label"] for p in r.json()["predictions"]]
    finally:
        srv.stop()
    assert got == want  # the service returns exactly what the trained head computes
    served_acc = sum(g == s.classname for g, s in zip(got, samples)) / len(samples)
    assert served_acc == pytest.approx(trained["tuned"], abs=1e-9)
    assert served_acc > 0.5  # 32 classes: chance is 3%
