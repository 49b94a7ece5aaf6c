"""Foundation: the hookable backbone, zero-shot/CoOp, the shared loop, the head artifact, the CLI."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import make_backbone
from clipheads.training.artifact import ArtifactError, load_head, save_head
from clipheads.training.backbone import Backbone, BackboneError, TowerHooks, load_backbone
from clipheads.training.loop import TrainConfig, epoch_lr, evaluate, train_head
from clipheads.training.methods import MethodError, TaskSpec, build_method, list_methods
from clipheads.training.methods.base import template_class_embeddings
from clipheads.training.data.records import Sample

ROOT = Path(__file__).resolve().parents[1]
ANY_HOOK = TowerHooks()  # identity hooks force the block-by-block path


def _assert_wrapper_matches(bb: Backbone, image_size: int) -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, image_size, image_size)
    tokens = bb.tokenize(["a photo of a dog.", "a sketch of a cat.", "x"])
    ref_img = F.normalize(bb.model.encode_image(images), dim=-1)
    ref_txt = F.normalize(bb.model.encode_text(tokens), dim=-1)
    assert torch.allclose(bb.encode_image(images, ANY_HOOK), ref_img, atol=1e-5)
    assert torch.allclose(bb.encode_text(tokens, ANY_HOOK), ref_txt, atol=1e-5)


def test_wrapper_without_hooks_matches_open_clip_micro(micro_backbone):
    _assert_wrapper_matches(micro_backbone, 32)


@pytest.mark.slow
def test_wrapper_without_hooks_matches_open_clip_vitb32():
    _assert_wrapper_matches(make_backbone("ViT-B-32"), 224)


def test_wrapper_handles_sequence_first_blocks():
    """open_clip towers built sequence-first (L, N, D) give the same features through the wrapper."""
    bb = make_backbone("test-vit-micro", seed=3)
    images = torch.randn(2, 3, 32, 32)
    tokens = bb.tokenize(["a red star", "a blue moon"])
    want_img, want_txt = bb.encode_image(images, ANY_HOOK), bb.encode_text(tokens, ANY_HOOK)
    for tr in (bb.model.visual.transformer, bb.model.transformer):
        tr.batch_first = False
        for blk in tr.resblocks:
            blk.attn.batch_first = False
    assert torch.allclose(bb.encode_image(images, ANY_HOOK), want_img, atol=1e-5)
    assert torch.allclose(bb.encode_text(tokens, ANY_HOOK), want_txt, atol=1e-5)
    # and open_clip itself agrees in that convention
    assert torch.allclose(F.normalize(bb.model.encode_image(images), dim=-1), want_img, atol=1e-5)


def test_hooks_really_reach_the_blocks(micro_backbone):
    class Shift(TowerHooks):
        # not a constant: every LayerNorm would remove a shift equal on all features (x + 1.0 made
        # this test pass or fail on rounding alone)
        def before_block(self, index, x):
            return x + torch.linspace(-1.0, 1.0, x.shape[-1]) if index == 1 else x

    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(micro_backbone.encode_image(images, Shift()), micro_backbone.encode_image(images))


def test_coop_init_from_phrase_equals_zero_shot_template(micro_backbone):
    task = TaskSpec("t", ("dog", "golden_retriever", "sports car"))
    head = build_method("coop", micro_backbone, [task], {"n_ctx": 4, "ctx_init": "a photo of a"})
    zs = template_class_embeddings(micro_backbone, task.classnames, ("a photo of a {}.",))
    assert torch.allclose(head.text_features(task.classnames), zs, atol=1e-6)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_class_token_positions_differ(micro_backbone, position):
    task = TaskSpec("t", ("dog", "cat"))
    torch.manual_seed(0)
    head = build_method("coop", micro_backbone, [task], {"n_ctx": 4, "class_token_position": position})
    feats = head.text_features(task.classnames)
    assert feats.shape == (2, micro_backbone.embed_dim)
    torch.manual_seed(0)
    end = build_method("coop", micro_backbone, [task], {"n_ctx": 4}).text_features(task.classnames)
    assert torch.allclose(feats, end) == (position == "end")


def test_parameter_counts_vitb16(vitb16_backbone):
    task = [TaskSpec("t", ("a", "b", "c"))]
    assert sum(p.numel() for p in vitb16_backbone.parameters() if p.requires_grad) == 0
    assert build_method("coop", vitb16_backbone, task, {"n_ctx": 16}).num_trainable() == 8_192
    assert build_method("coop", vitb16_backbone, task, {"n_ctx": 4, "ctx_init": "a photo of a"}).num_trainable() == 2_048
    assert build_method("coop", vitb16_backbone, task, {"n_ctx": 16, "class_specific": True}).num_trainable() == 3 * 16 * 512
    assert build_method("zeroshot", vitb16_backbone, task).num_trainable() == 0


def test_registry_refuses_unknown_names_and_fields(micro_backbone):
    with pytest.raises(MethodError, match="known methods: .*coop"):
        build_method("nope", micro_backbone, [TaskSpec("t", ("a",))])
    with pytest.raises(MethodError, match="unknown CoOpConfig field"):
        build_method("coop", micro_backbone, [TaskSpec("t", ("a",))], {"n_ctxx": 3})
    assert {"zeroshot", "coop"} <= set(list_methods())


def test_text_only_methods_work_on_a_resnet_tower(rn_backbone):
    task = TaskSpec("t", ("dog", "cat"))
    head = build_method("coop", rn_backbone, [task], {"n_ctx": 4})
    assert head.logits(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(BackboneError, match="VisionTransformer"):
        rn_backbone.encode_image(torch.randn(1, 3, 32, 32), ANY_HOOK)


def test_dassl_schedule():
    cfg = TrainConfig(epochs=5, lr=1.0, warmup_epochs=1)
    got = [round(epoch_lr(cfg, e), 3) for e in range(5)]
    assert got == [0.0, 1.0, 0.905, 0.655, 0.345]
    cfg = TrainConfig(epochs=5, lr=1.0, warmup_epochs=0)
    assert [round(epoch_lr(cfg, e), 3) for e in range(5)] == [1.0, 0.905, 0.655, 0.345, 0.095]


# ---- training end to end on a tiny generated ImageFolder ------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}


def make_colour_folder(root: Path, per_class: int = 8) -> Path:
    """Three trivially separable classes so a few steps of training must lower the loss."""
    for name, rgb in COLOURS.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (40, 40), tuple(max(0, c - 4 * i) for c in rgb))
            ImageDraw.Draw(img).ellipse((5 + i, 5, 30, 30 - i), fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
            img.save(d / f"{i}.png")
    return root


def _samples(root: Path) -> list[Sample]:
    names = sorted(COLOURS)
    return [Sample(str(p), names.index(p.parent.name), p.parent.name) for p in sorted(root.glob("*/*.png"))]


def test_training_changes_only_the_head_and_round_trips(tmp_path):
    bb = make_backbone("test-vit-micro", seed=1)
    root = make_colour_folder(tmp_path / "data")
    task = TaskSpec("colours", tuple(sorted(COLOURS)))
    head = build_method("coop", bb, [task], {"n_ctx": 4})
    before_backbone = bb.parameters_checksum()
    before_ctx = head.ctx.detach().clone()
    cfg = TrainConfig(epochs=6, batch_size=8, lr=0.05, warmup_epochs=0, progress=False)
    result = train_head(head, {0: _samples(root)}, cfg)
    assert bb.parameters_checksum() == before_backbone
    assert not torch.equal(head.ctx.detach(), before_ctx)
    assert result.final_loss < result.first_loss
    path = save_head(head, tmp_path / "colours.head.safetensors", result.summary())
    loaded = load_head(path).build(bb)
    assert torch.equal(loaded.ctx, head.ctx)
    samples = _samples(root)
    assert evaluate(loaded, samples)["top1"] == evaluate(head, samples)["top1"]


def test_multi_task_training_records_per_task_metrics(tmp_path):
    bb = make_backbone("test-vit-micro", seed=1)
    root = make_colour_folder(tmp_path / "data", per_class=4)
    s = _samples(root)
    flipped = [Sample(x.path, 2 - x.label, x.classname) for x in s]
    tasks = [TaskSpec("a", ("blue", "green", "red")), TaskSpec("b", ("red", "green", "blue"))]
    head = build_method("coop", bb, tasks, {"n_ctx": 2})
    res = train_head(head, {0: s, 1: flipped}, TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, progress=False))
    assert set(res.history[-1]["per_task"]) == {"a", "b"}


# ---- artifact refusals -----------------------------------------------------------------------
@pytest.fixture()
def saved_head(tmp_path, micro_backbone):
    head = build_method("coop", micro_backbone, [TaskSpec("t", ("a", "b"))], {"n_ctx": 4})
    return save_head(head, tmp_path / "ok.head.safetensors", {"epochs": 0})


def test_refuses_pickle_renamed_to_safetensors(tmp_path):
    p = tmp_path / "evil.head.safetensors"
    p.write_bytes(pickle.dumps({"ctx": torch.zeros(2)}))
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_head(p)


def test_refuses_truncated_and_foreign_files(tmp_path, saved_head):
    p = tmp_path / "cut.head.safetensors"
    p.write_bytes(saved_head.read_bytes()[:100])
    with pytest.raises(ArtifactError):
        load_head(p)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.head.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not a clipheads head"):
        load_head(plain)


def _rewrite_meta(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["clipheads"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata={"clipheads": json.dumps(meta)})
    return dst


def test_refuses_unknown_format_version(tmp_path, saved_head):
    p = _rewrite_meta(saved_head, tmp_path / "v9.head.safetensors", lambda m, t: m.update(format_version=9))
    with pytest.raises(ArtifactError, match="format_version 9"):
        load_head(p)


def test_header_reader_checks_what_load_head_checks_without_torch(tmp_path, saved_head):
    """`read_head_header` (what `serve` and `models save` use) refuses what load_head refuses from
    the header alone: truncated tensor bytes, non-fp32 tensors, incomplete metadata; and it runs
    in a process that never imports torch."""
    from clipheads.training.head_header import read_head_header

    cut = tmp_path / "cut.head.safetensors"
    cut.write_bytes(saved_head.read_bytes()[:-8])  # header intact, the last tensor short
    for read in (read_head_header, load_head):
        with pytest.raises(ArtifactError, match="ends before its tensors"):
            read(cut)
    half = _rewrite_meta(saved_head, tmp_path / "f16.head.safetensors", lambda m, t: t.update(ctx=t["ctx"].half()))
    with pytest.raises(ArtifactError, match="'ctx' is F16; heads store fp32"):
        read_head_header(half)
    notasks = _rewrite_meta(saved_head, tmp_path / "bad.head.safetensors", lambda m, t: m["tasks"][0].pop("classnames"))
    with pytest.raises(ArtifactError, match="incomplete head metadata"):
        read_head_header(notasks)
    probe = ("import sys; from clipheads.training.head_header import read_head_header; "
             f"h = read_head_header({str(saved_head)!r}); print(h.method, h.tensor_shapes); "
             "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == load_head(saved_head).method and "'ctx'" in r.stdout


def test_refuses_tensors_that_do_not_match_the_config(tmp_path, saved_head, micro_backbone):
    def grow(meta, tensors):
        tensors["ctx"] = torch.zeros(7, tensors["ctx"].shape[1])

    p = _rewrite_meta(saved_head, tmp_path / "shape.head.safetensors", grow)
    with pytest.raises(ArtifactError, match="shape mismatch"):
        load_head(p).build(micro_backbone)


def test_refuses_head_for_another_backbone(saved_head, rn_backbone):
    with pytest.raises(ArtifactError, match="trained for backbone 'test-vit-micro'"):
        load_head(saved_head).build(rn_backbone)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipheads", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_exit_code_2_on_bad_heads(tmp_path, saved_head):
    evil = tmp_path / "evil.head.safetensors"
    evil.write_bytes(pickle.dumps([1, 2, 3]))
    r = _cli("info", str(evil))
    assert r.returncode == 2 and "not a safetensors file" in r.stderr
    r = _cli("info", str(saved_head), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["method"] == "coop"


def test_offline_missing_weights_is_one_clear_error():
    # HF_HUB_OFFLINE=1 (conftest) and an empty cache: the openai tag cannot be fetched.
    with pytest.raises(BackboneError, match="Supply them one of these ways"):
        load_backbone("ViT-B-32", "openai")
    with pytest.raises(BackboneError, match="weights file not found"):
        load_backbone("ViT-B-32", "/nonexistent/weights.safetensors")
    with pytest.raises(BackboneError, match="unknown pretrained tag"):
        load_backbone("ViT-B-32", "no-such-tag")
