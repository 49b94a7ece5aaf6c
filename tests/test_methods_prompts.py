"""Prompt methods (VPT, IVLP, MaPLe, COMMA, CoCoOp): exact counts, prompt mechanics, coupling,
COMMA's gradient modes and distillation loss, refusal of non-ViT towers, a training smoke test."""
from __future__ import annotations

import pytest
import torch

from clipheads.training.backbone import BackboneError, TowerHooks
from clipheads.training.methods import MethodError, TaskSpec, build_method
from clipheads.training.methods.base import template_class_embeddings

NAMES = ("cat", "dog", "red car")
TASKS = (TaskSpec("toy", NAMES),)
MICRO3 = {"vpt": {"depth": 3}, "ivlp": {}, "maple": {"depth": 3}, "comma": {"depth": 3}, "cocoop": {}}
VISION_PROMPTED = ("vpt", "ivlp", "maple", "comma")


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _noise(like: torch.Tensor, seed: int = 7) -> torch.Tensor:
    # random, not a constant shift: LayerNorm removes a shift shared by all channels of a token
    return 0.5 * torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


def _build(name, backbone, config=None, tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    return build_method(name, backbone, tasks, config if config is not None else MICRO3.get(name, {}))


class _Record(TowerHooks):
    """Wraps a method's hooks; records the sequence entering each block (after the hook)."""

    def __init__(self, inner: TowerHooks):
        self.inner, self.seen = inner, {}

    def on_input(self, x):
        return self.inner.on_input(x)

    def before_block(self, i, x):
        x = self.inner.before_block(i, x)
        self.seen[i] = x.detach().clone()
        return x

    def after_block(self, i, block, x_in, x_out):
        return self.inner.after_block(i, block, x_in, x_out)


# ---- exact trainable-parameter counts (METHODS.md 8) ---------------------------------------
@pytest.mark.parametrize("name,config,formula,documented", [
    ("vpt", {}, 8 * 768 * 12, 73_728),
    ("vpt", {"depth": 1}, 8 * 768, 6_144),  # shallow
    ("ivlp", {}, 2 * 512 * 12 + 2 * 768 * 12, 30_720),
    ("maple", {}, 9 * (2 * 512 + 512 * 768 + 768), 3_555_072),
    ("maple", {"depth": 3}, 3 * (2 * 512 + 512 * 768 + 768), 1_185_024),
    ("comma", {}, 1024 + 393_984 + 8 * 1024 + 8 * 1536 + 8 * 691_392, 5_946_624),
    ("comma", {"detach_generator": True}, 1024 + 393_984 + 8 * 1024 + 8 * 1536 + 8 * 691_392, 5_946_624),
    ("comma", {"depth": 3}, 1024 + 393_984 + 2 * 1024 + 2 * 1536 + 2 * 691_392, 1_782_912),
    ("cocoop", {}, 4 * 512 + (512 * 32 + 32) + (32 * 512 + 512), 35_360),
])
def test_counts_on_vitb16_are_exact(vitb16_backbone, name, config, formula, documented):
    assert formula == documented  # METHODS.md 8's formula gives its number
    head = build_method(name, vitb16_backbone, TASKS, config)
    assert head.num_trainable() == documented
    assert sum(p.numel() for p in head.parameters()) == documented  # nothing frozen hides in the head
    assert not any(p.requires_grad for p in vitb16_backbone.parameters())


def test_method_metadata():
    from clipheads.training.methods import get_method

    for name in ("vpt", "ivlp", "maple", "comma"):
        assert get_method(name).foldable and get_method(name).summary
    assert get_method("vpt").towers == ("vision",)
    assert get_method("cocoop").foldable is False and "NOT foldable" in get_method("cocoop").summary


# ---- refusal of non-ViT image towers -----------------------------------------------------
@pytest.mark.parametrize("name", VISION_PROMPTED)
def test_vision_prompt_methods_refuse_resnet(rn_backbone, name):
    with pytest.raises(BackboneError, match=rf"method '{name}'.*VisionTransformer.*ModifiedResNet"):
        build_method(name, rn_backbone, TASKS)


def test_cocoop_runs_on_resnet(rn_backbone):
    head = _build("cocoop", rn_backbone)
    assert head.logits(_images(2)).shape == (2, len(NAMES))


# ---- folding: class-independent vision prompts are constants under no_grad ---------------
@pytest.mark.parametrize("name", VISION_PROMPTED)
def test_image_hooks_under_no_grad_are_constants(micro_backbone, name):
    head = _build(name, micro_backbone)
    with torch.no_grad():
        hooks = head.image_hooks()
    tensors = [hooks.shallow, *hooks.deep.values()]
    assert len(tensors) == 3  # micro ViT: 3 blocks, all prompted
    assert all(not t.requires_grad and t.grad_fn is None for t in tensors)
    with torch.no_grad():
        a = micro_backbone.encode_image(_images(), hooks)
        b = head.image_features(_images())
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- VPT ---------------------------------------------------------------------------------
def test_vpt_appends_then_replaces_slots(micro_backbone):
    head = _build("vpt", micro_backbone, {"depth": 3, "n_ctx": 5})
    rec = _Record(head.image_hooks())
    with torch.no_grad():
        f = micro_backbone.encode_image(_images(2), rec)
    assert f.shape == (2, micro_backbone.embed_dim)
    n_plain = 1 + (32 // 8) ** 2  # CLS + 16 patches
    p = head.prompts.detach()
    for i in range(3):
        assert rec.seen[i].shape == (2, n_plain + 5, 48)
        if i > 0:  # deep prompts overwrite the last n tokens at the input of blocks 1..2
            torch.testing.assert_close(rec.seen[i][:, -5:], p[i].expand(2, -1, -1), atol=0, rtol=0)
    # block 0's slots went through ln_pre: not the raw prompt, but prompts sit after the patches
    ln = micro_backbone.model.visual.ln_pre
    torch.testing.assert_close(rec.seen[0][0, -5:], ln(p[0]), atol=1e-6, rtol=0)


def test_vpt_shallow_and_deep_differ_and_deep_prompts_matter(micro_backbone):
    images = _images()
    deep = _build("vpt", micro_backbone, {"depth": 3})
    shallow = _build("vpt", micro_backbone, {"depth": 1})
    assert deep.prompts.shape[0] == 3 and shallow.prompts.shape[0] == 1
    with torch.no_grad():
        shallow.prompts.copy_(deep.prompts[:1])  # same input prompt, deep adds blocks 1, 2
        f_deep, f_shallow = deep.image_features(images), shallow.image_features(images)
        plain = micro_backbone.encode_image(images)
        assert (f_deep - f_shallow).abs().max() > 1e-4
        assert (f_shallow - plain).abs().max() > 1e-4
        deep.prompts[2] += _noise(deep.prompts[2])  # the last block's own prompt changes the output
        assert (deep.image_features(images) - f_deep).abs().max() > 1e-4
    # default depth 12 is clipped to the 3-block tower
    assert _build("vpt", micro_backbone, {}).prompts.shape == (3, 8, 48)
    with pytest.raises(MethodError, match="depth"):
        _build("vpt", micro_backbone, {"depth": 0})


def test_vpt_text_side_is_the_frozen_generic_template(micro_backbone):
    pets = (TaskSpec("oxford_pets", NAMES, ("a photo of a {}, a type of pet.",)),)
    head = _build("vpt", micro_backbone, tasks=pets)
    w = head.text_features(NAMES)
    torch.testing.assert_close(w, template_class_embeddings(micro_backbone, NAMES, ("a photo of a {}.",)))
    assert not w.requires_grad
    per_dataset = template_class_embeddings(micro_backbone, NAMES, pets[0].templates)
    assert (w - per_dataset).abs().max() > 1e-4


# ---- IVLP --------------------------------------------------------------------------------
def test_ivlp_text_and_vision_prompts_are_independent(micro_backbone):
    head = _build("ivlp", micro_backbone)
    init = micro_backbone.embed_tokens(micro_backbone.tokenize(["a photo"]))[0, 1:3]
    torch.testing.assert_close(head.text.ctx.detach(), init)  # "a", "photo"; "of a" stays fixed
    ph = head.text.builder.placeholders(NAMES)
    assert micro_backbone.tokenize(["a photo of a cat."])[0].tolist() == ph.tokens[0].tolist()
    images = _images()
    with torch.no_grad():
        w0, f0 = head.text_features(NAMES), head.image_features(images)
        head.text.deep[1] += _noise(head.text.deep[1])  # text prompt at block 2
        w1, f1 = head.text_features(NAMES), head.image_features(images)
        head.vision[2] += _noise(head.vision[2])  # vision prompt at block 2
        w2, f2 = head.text_features(NAMES), head.image_features(images)
    assert (w1 - w0).abs().max() > 1e-4
    torch.testing.assert_close(f1, f0, atol=0, rtol=0)  # no coupling text -> vision
    assert (f2 - f1).abs().max() > 1e-4
    torch.testing.assert_close(w2, w1, atol=0, rtol=0)  # nor vision -> text


# ---- MaPLe and COMMA: vision prompts are functions of text-side parameters only ------------
@pytest.mark.parametrize("name", ["maple", "comma"])
def test_vision_prompts_depend_on_text_parameters_not_class_names(micro_backbone, name):
    images = _images()
    head = _build(name, micro_backbone)
    other = _build(name, micro_backbone, tasks=(TaskSpec("other", ("airplane", "tree")),), seed=1)
    other.load_state_dict(head.state_dict())
    with torch.no_grad():
        f = head.image_features(images)
        torch.testing.assert_close(other.image_features(images), f, atol=0, rtol=0)
        head.text_features(("pizza", "sea")), head.text_features(NAMES)  # class lists do not leak
        torch.testing.assert_close(head.image_features(images), f, atol=0, rtol=0)
        for param in (head.text.ctx, head.text.deep):  # each text-side tensor moves the image side
            before = head.image_features(images)
            param.add_(_noise(param))
            assert (head.image_features(images) - before).abs().max() > 1e-4
    assert not any("vision" in k for k in head.state_dict())  # no free vision prompts


def test_maple_deep_projections_start_as_copies_of_one_linear(micro_backbone):
    # official init: F_1..F_{J-1} are deep copies of one Linear (_get_clones), F_0 is drawn on its own
    head = _build("maple", micro_backbone)
    f0, f1, f2 = head.proj
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(f1, name), getattr(f2, name), atol=0, rtol=0)
        assert not torch.equal(getattr(f0, name), getattr(f1, name))
    assert f1.weight.data_ptr() != f2.weight.data_ptr()  # copies that train apart, not one shared module


def test_maple_vision_prompt_is_same_depth_projection(micro_backbone):
    head = _build("maple", micro_backbone)
    assert len(head.proj) == 3
    rec = _Record(head.image_hooks())
    with torch.no_grad():
        micro_backbone.encode_image(_images(2), rec)
        for b in (1, 2):
            expected = head.proj[b](head.text.deep[b - 1])
            torch.testing.assert_close(rec.seen[b][:, -2:], expected.expand(2, -1, -1), atol=0, rtol=0)
        # the text side's deep prompts overwrite positions 1..2 at the same blocks
        trec = _Record(head.text.hooks())
        tokens, emb = head.text.builder.embed(NAMES, head.text.ctx)
        micro_backbone.encode_text(tokens, trec, embeddings=emb)
        torch.testing.assert_close(trec.seen[2][:, 1:3], head.text.deep[1].expand(3, -1, -1), atol=0, rtol=0)


def test_comma_generator_chain(micro_backbone):
    head = _build("comma", micro_backbone)
    with torch.no_grad():
        vis = head.vision_prompts()
        torch.testing.assert_close(vis[0], head.proj(head.text.ctx))
        torch.testing.assert_close(vis[1], head.generators[0](vis[0], head.text.ctx))
        torch.testing.assert_close(vis[2], head.generators[1](vis[1], head.text.deep[0]))
        head.image_hooks()  # records the generated deep prompts in compound_prompts_image
    torch.testing.assert_close(head.compound_prompts_image.detach(), torch.stack(vis[1:]))


# ---- COMMA gradient modes ----------------------------------------------------------------
@pytest.mark.parametrize("detach", [False, True])
def test_comma_generator_gradients(micro_backbone, detach):
    config = {"depth": 3, "detach_generator": True} if detach else {"depth": 3}  # default = paper
    head = _build("comma", micro_backbone, config)
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    loss, _ = head.training_loss(images, labels)
    loss.backward()
    gen_grads = [p.grad for p in head.generators.parameters()]
    if detach:
        assert all(g is None or float(g.abs().sum()) == 0 for g in gen_grads)
    else:
        assert all(g is not None and float(g.abs().sum()) > 0 for g in gen_grads)
    if detach:  # the released code reads the deep vision prompts from this tensor: it gets their gradient
        assert float(head.compound_prompts_image.grad.abs().sum()) > 0
    else:
        assert head.compound_prompts_image.grad is None  # a record, never in the graph
    assert float(head.text.ctx.grad.abs().sum()) > 0 and float(head.proj.weight.grad.abs().sum()) > 0

    # image-only loss: the deep text prompt P_t^1 reaches the image only through G_1
    head.zero_grad(set_to_none=True)
    head.image_features(images).sum().backward()
    g = head.text.deep.grad
    if detach:
        assert g is None or float(g.abs().sum()) == 0
    else:
        assert float(g[0].abs().sum()) > 0  # P_t^1 -> G_1 -> P_v^2
        assert float(g[1].abs().sum()) == 0  # P_t^2 feeds no generator when J = 3


# ---- COMMA distillation loss -------------------------------------------------------------
def test_comma_kd_is_zero_when_student_equals_teacher(micro_backbone):
    # depth 1, ctx = embeddings of "a photo": the student sentence IS "a photo of a {c}."
    cfg = {"depth": 1, "teacher_template": "a photo of a {}."}
    head = _build("comma", micro_backbone, cfg)
    kd = float(head.distillation_loss(0, NAMES).detach())
    assert abs(kd) < 1e-5
    with torch.no_grad():
        head.text.ctx.add_(_noise(head.text.ctx))
    opt = torch.optim.SGD(head.trainable_parameters(), lr=10.0)
    losses = []
    for _ in range(6):  # minimising L_kd alone pulls the student back towards the teacher
        opt.zero_grad()
        loss = head.distillation_loss(0, NAMES)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 1e-2
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.75 * losses[0], losses


def test_comma_kd_loss_wiring(micro_backbone, monkeypatch):
    head = _build("comma", micro_backbone, {"depth": 3, "kd_weight": 2.0})
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    kd = head.distillation_loss(0, NAMES)
    assert 0 < kd.item() < 2
    total, logits = head.training_loss(images, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(total, ce + 2.0 * kd)  # the student tokens reused from the class matrix
    calls = []
    real = micro_backbone.encode_text
    monkeypatch.setattr(micro_backbone, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    head.training_loss(images, labels)[0].backward()
    assert len(calls) == 1  # KD reuses the class-matrix text pass; the teacher is cached
    monkeypatch.undo()
    two = _build("comma", micro_backbone, {"depth": 3, "kd_last_layers": 2})
    assert two.kd_blocks == (1, 2) and two.distillation_loss(0, NAMES).item() > 0
    with pytest.raises(MethodError, match="kd_last_layers"):
        _build("comma", micro_backbone, {"kd_last_layers": 4})
    assert _build("comma", micro_backbone, {"kd_weight": 0.0}).extra_loss(0, NAMES) is None


def test_comma_teacher_template(micro_backbone):
    dtd = _build("comma", micro_backbone, tasks=(TaskSpec("dtd", ("banded",), ("{} texture.",)),))
    assert dtd.teacher_sentences(0, ("banded",)) == ["a photo of a banded, a type of texture."]
    own = _build("comma", micro_backbone, tasks=(TaskSpec("toy", NAMES, ("a drawing of a {}.",)),))
    assert own.teacher_sentences(0, ("red_car",)) == ["a drawing of a red car."]


# ---- CoCoOp ------------------------------------------------------------------------------
def test_cocoop_is_not_foldable_and_conditions_on_each_image(micro_backbone):
    head = _build("cocoop", micro_backbone)
    with pytest.raises(MethodError, match="image"):
        head.text_features(NAMES)
    images = _images(3)
    with torch.no_grad():
        logits = head.logits(images)
        assert logits.shape == (3, len(NAMES))
        for b in range(3):  # per-image class matrices: batching changes nothing
            torch.testing.assert_close(head.logits(images[b : b + 1])[0], logits[b], atol=1e-5, rtol=0)
        chunked = _build("cocoop", micro_backbone, {"max_text_sequences": 4})  # one image per text pass
        chunked.load_state_dict(head.state_dict())
        torch.testing.assert_close(chunked.logits(images), logits, atol=1e-5, rtol=0)
        # zero Meta-Net output == CoOp with the same context ("a photo of a", M = 4)
        coop = _build("coop", micro_backbone, {"n_ctx": 4, "ctx_init": "a photo of a"})
        coop.ctx.copy_(head.ctx)
        plain = coop.logits(images)
        assert (plain - logits).abs().max() > 1e-4
        head.meta_net[2].weight.zero_()
        head.meta_net[2].bias.zero_()
        torch.testing.assert_close(head.logits(images), plain, atol=1e-5, rtol=0)


# ---- training smoke ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MICRO3))
def test_a_few_sgd_steps_reduce_the_loss(micro_backbone, name):
    head = _build(name, micro_backbone)
    before = micro_backbone.parameters_checksum() if name == "comma" else None
    images, labels = _images(8, seed=3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.SGD(head.trainable_parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss, _ = head.training_loss(images, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(head.training_loss(images, labels)[0].item())
    assert losses[-1] < losses[0], losses
    if before is not None:
        assert micro_backbone.parameters_checksum() == before


@pytest.mark.parametrize("name", sorted(MICRO3))
def test_head_artifact_round_trip(micro_backbone, tmp_path, name):
    from clipheads.training.artifact import load_head, save_head

    head = _build(name, micro_backbone)
    with torch.no_grad():
        expected = head.logits(_images(2))
        path = save_head(head, tmp_path / f"{name}.head.safetensors")
        again = load_head(path).build(micro_backbone)
        torch.testing.assert_close(again.logits(_images(2)), expected, atol=0, rtol=0)
