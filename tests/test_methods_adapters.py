"""MMA (Multi-Modal Adapter): parameter count, the shared layer, alpha, the gradient-scale trick."""
from __future__ import annotations

import pytest
import torch

from clipheads.training.backbone import BackboneError
from clipheads.training.methods import MethodError, TaskSpec, build_method
from clipheads.training.methods.mma import default_adapter_blocks

NAMES = ("cat", "dog", "red car")
TASKS = (TaskSpec("toy", NAMES),)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_mma_count_on_vitb16_is_exact(vitb16_backbone):
    head = build_method("mma", vitb16_backbone, TASKS)
    assert head.text_blocks == head.vision_blocks == tuple(range(4, 12))
    r = 32
    per_block = (512 * r + r) + (r * 512 + 512) + (768 * r + r) + (r * 768 + 768) + (r * r + r)
    assert per_block == 84_320
    assert head.num_trainable() == 8 * per_block == 674_560
    # only adapters are stored; the backbone is not part of the head
    assert set(head.state_dict()) == {
        f"{part}.{k}.{w}" for part in ("text_down", "text_up", "vision_down", "vision_up", "shared")
        for k in range(8) for w in ("weight", "bias")
    }


def test_default_blocks_scale_with_depth(micro_backbone):
    assert default_adapter_blocks(12) == tuple(range(4, 12))
    assert default_adapter_blocks(24) == tuple(range(8, 24))
    assert default_adapter_blocks(24, 8) == tuple(range(16, 24))  # ViT-L/14 vision, paired with 12 text blocks
    assert default_adapter_blocks(3) == (1, 2)
    head = build_method("mma", micro_backbone, TASKS)
    assert head.text_blocks == head.vision_blocks == (1, 2)
    assert build_method("mma", micro_backbone, TASKS, {"blocks": [0, 2]}).vision_blocks == (0, 2)
    with pytest.raises(MethodError, match="0..2"):
        build_method("mma", micro_backbone, TASKS, {"blocks": [3]})
    with pytest.raises(MethodError, match="same number"):
        build_method("mma", micro_backbone, TASKS, {"blocks": [1, 2], "vision_blocks": [2]})


def test_mma_init_is_kaiming_fan_out_zero_bias(micro_backbone):
    torch.manual_seed(0)
    head = build_method("mma", micro_backbone, TASKS)
    up = head.vision_up[0]  # Linear(32 -> 48): fan_out = 48
    assert torch.count_nonzero(up.bias) == 0
    std = float(up.weight.detach().std())
    assert abs(std - (2.0 / 48) ** 0.5) < 0.25 * (2.0 / 48) ** 0.5


def test_shared_layer_gets_gradient_from_each_tower_alone(micro_backbone):
    head = build_method("mma", micro_backbone, TASKS)
    direction = torch.randn(micro_backbone.embed_dim, generator=torch.Generator().manual_seed(1))

    (head.text_features(NAMES) @ direction).sum().backward()  # text-only loss
    assert all(float(s.weight.grad.abs().sum()) > 0 for s in head.shared)
    assert all(float(m.weight.grad.abs().sum()) > 0 for m in head.text_down)
    assert all(m.weight.grad is None for m in head.vision_down)
    head.zero_grad(set_to_none=True)

    (head.image_features(_images()) @ direction).sum().backward()  # image-only loss
    assert all(float(s.weight.grad.abs().sum()) > 0 for s in head.shared)
    assert all(float(m.weight.grad.abs().sum()) > 0 for m in head.vision_up)
    assert all(m.weight.grad is None for m in head.text_down)


def test_alpha_zero_is_plain_clip_and_alpha_one_is_not(micro_backbone):
    bb = micro_backbone
    images = _images()
    plain_img = bb.encode_image(images)
    plain_txt = bb.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES]))
    head = build_method("mma", bb, TASKS, {"alpha": 0.0})
    torch.testing.assert_close(head.image_features(images), plain_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(head.text_features(NAMES), plain_txt, atol=1e-6, rtol=0)
    # the adapters really are in both towers: a large alpha moves both
    head = build_method("mma", bb, TASKS, {"alpha": 1.0})
    with torch.no_grad():
        assert float((head.image_features(images) - plain_img).abs().max()) > 1e-3
        assert float((head.text_features(NAMES) - plain_txt).abs().max()) > 1e-3


@pytest.mark.parametrize("alpha", [0.001, 0.1])
def test_gradient_scale_trick(micro_backbone, alpha):
    """Adapter grads x 1/alpha; the gradient reaching anything upstream is unchanged."""
    bb = micro_backbone
    torch.manual_seed(0)
    trick = build_method("mma", bb, TASKS, {"alpha": alpha})
    plain = build_method("mma", bb, TASKS, {"alpha": alpha, "grad_scale": False})
    plain.load_state_dict(trick.state_dict())
    tokens = bb.tokenize([f"a photo of a {n}." for n in NAMES])
    emb0 = bb.embed_tokens(tokens)
    images0, labels = _images(6, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    upstream = {}
    for name, head in (("trick", trick), ("plain", plain)):
        images = images0.clone().requires_grad_(True)
        emb = emb0.clone().requires_grad_(True)
        w = bb.encode_text(tokens, head.tower_hooks("text"), embeddings=emb)  # (C, E)
        logits = bb.logit_scale * head.image_features(images) @ w.t()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        upstream[name] = (images.grad, emb.grad)
    # forward identical, upstream (pixels, word embeddings) gradients identical
    for got, want in zip(upstream["trick"], upstream["plain"]):
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)  # float round-off only
    for (name, p_trick), p_plain in zip(trick.named_parameters(), plain.parameters()):
        scale = float(p_plain.grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(p_trick.grad * alpha, p_plain.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_no_grad_forward_is_the_same_graph_as_training(micro_backbone):
    head = build_method("mma", micro_backbone, TASKS)
    images = _images()
    with torch.no_grad():
        folded = head.image_features(images)
        w = head.text_features(NAMES)
    torch.testing.assert_close(folded, head.image_features(images).detach())
    torch.testing.assert_close(w, head.text_features(NAMES).detach())
    assert head.foldable


def test_mma_refuses_resnet_backbone(rn_backbone):
    with pytest.raises(BackboneError, match="VisionTransformer"):
        build_method("mma", rn_backbone, TASKS)


def test_sgd_steps_reduce_loss_on_two_tasks(micro_backbone):
    torch.manual_seed(0)
    tasks = (TaskSpec("a", ("cat", "dog")), TaskSpec("b", ("car", "tree", "boat")))
    head = build_method("mma", micro_backbone, tasks)
    data = [(_images(8, seed=10), torch.tensor([0, 1] * 4)), (_images(9, seed=11), torch.tensor([0, 1, 2] * 3))]
    # alpha * (1/alpha-scaled grads) leaves an effective output step of alpha * lr: on a random
    # micro model a large lr is needed to see the loss move in a few steps
    opt = torch.optim.SGD(head.configure_optimizer_groups(), lr=0.2, momentum=0.9)

    def total() -> torch.Tensor:
        return sum(head.training_loss(x, y, t)[0] for t, (x, y) in enumerate(data))

    with torch.no_grad():
        before = float(total())
    for _ in range(8):
        opt.zero_grad()
        total().backward()
        opt.step()
    with torch.no_grad():
        after = float(total())
    assert after < before - 0.1, (before, after)


def test_mma_head_round_trips_through_the_artifact(micro_backbone, tmp_path):
    from clipheads.training.artifact import load_head, save_head

    head = build_method("mma", micro_backbone, TASKS, {"blocks": [0, 2], "alpha": 0.01})
    loaded = load_head(save_head(head, tmp_path / "mma.head.safetensors")).build(micro_backbone)
    assert loaded.config == head.config and loaded.text_blocks == (0, 2)
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(images), head.logits(images), atol=0, rtol=0)


def _onnx_image_graph_matches(head, task: int, images: torch.Tensor) -> float:
    """Export `head`'s image graph for `task` under no_grad (as export does) and run it in ORT."""
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime")

    class ImageGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x):
            return self.head.image_features(x, task)

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own tracer/deprecation chatter
        want = head.image_features(images, task).numpy()
        torch.onnx.export(ImageGraph(), (images,), buf, input_names=["pixels"], output_names=["features"], dynamo=False)
    got = ort.InferenceSession(buf.getvalue()).run(None, {"pixels": images.numpy()})[0]
    return float(abs(got - want).max())


def test_mma_image_graph_exports_to_onnx(micro_backbone):
    head = build_method("mma", micro_backbone, TASKS)
    assert _onnx_image_graph_matches(head, 0, _images(2)) < 1e-5
