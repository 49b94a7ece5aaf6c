"""Heads that change the image tower (VPT here; MaPLe, MMA, ... alike) served from a head file and
from its bundle: every runtime scores zero-shot labels and few-shot tasks on the same image path
(`bundle.zero_shot_path`), and `clipheads serve HEAD` becomes ready and answers (its warm-up once
sent an empty logits array the encoder hop could not frame)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_serving import Server, png, post

httpx = pytest.importorskip("httpx")
RED = png((230, 10, 10))


def _vpt_head(d: Path) -> Path:
    from conftest import make_backbone
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    bb = make_backbone("test-vit-micro", seed=0)
    ckpt = d / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(ckpt))
    bb = load_backbone("test-vit-micro", str(ckpt))
    import torch

    torch.manual_seed(0)
    head = build_method("vpt", bb, [TaskSpec("color", ("red", "green", "blue"))], {})
    with torch.no_grad():
        head.prompts.mul_(20.0)  # prompts far from init: the prompted and the plain tower differ clearly
    return save_head(head, d / "vpt.head.safetensors")


@pytest.fixture(scope="module")
def vpt_head(tmp_path_factory) -> Path:
    return _vpt_head(tmp_path_factory.mktemp("vpt"))


def test_every_runtime_scores_zero_shot_on_the_same_image_path(vpt_head, tmp_path):
    from clipheads.export.heads import load_heads
    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.serving.runtimes import FoldedTorchRuntime, OnnxRuntime, TorchRuntime

    heads, meta, pre = load_heads([str(vpt_head)])
    assert export_heads(heads, tmp_path / "b", ExportOptions(probes=8), heads_meta=meta, preprocess=pre).passed
    px = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    runtimes = [TorchRuntime(vpt_head, device="cpu"), FoldedTorchRuntime(vpt_head, device="cpu"),
                OnnxRuntime(tmp_path / "b")]
    feats = [rt.run_path(rt.base_path, px)[1] for rt in runtimes]
    for f in feats[1:]:
        np.testing.assert_allclose(f, feats[0], atol=1e-4)
    plain = heads[0].backbone.encode_image(runtimes[0]._pixels(px)).detach().numpy()
    assert np.abs(plain - feats[0]).max() > 1e-2  # the head's tower, not plain CLIP (no plain graph shipped)
    assert all(len(rt.paths) == 1 for rt in runtimes)

    # beside a zero-shot head the bundle has a plain image graph: zero-shot labels use it
    from clipheads.training.methods import TaskSpec, build_method

    zs = build_method("zeroshot", heads[0].backbone, [TaskSpec("shape", ("circle", "square"))])
    assert export_heads([heads[0], zs], tmp_path / "two", ExportOptions(probes=8), preprocess=pre).passed
    two = OnnxRuntime(tmp_path / "two")
    assert two.base_path != 0 and json.loads((tmp_path / "two" / "manifest.json").read_text())["text"]["image_graph"]
    np.testing.assert_allclose(two.run_path(two.base_path, px)[1], plain, atol=1e-4)


def test_a_vpt_head_file_serves(vpt_head, tmp_path):
    srv = Server(vpt_head, None, tmp_path / "server.log")
    try:
        assert httpx.get(srv.url + "/readyz", timeout=5).status_code == 200
        r = post(srv, "/classify", files=[("images", ("r.png", RED, "image/png"))])
        assert r.status_code == 200 and {d["label"] for d in r.json()["predictions"][0]["color"]} == {"red", "green", "blue"}
        r = post(srv, "/zero_shot", files=[("images", ("r.png", RED, "image/png"))], data={"labels": '["ruby", "sky"]'})
        assert r.status_code == 200, r.text
    finally:
        srv.stop()
