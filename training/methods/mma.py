"""MMA: Multi-Modal Adapter (Yang et al., CVPR 2024), METHODS.md 5.

Bottleneck adapters run in parallel with blocks of *both* towers; the middle layer of each
block's adapter is one module shared by text and vision, which is what couples the modalities.
Per adapted block b and branch m (text: d = D_t, vision: d = D_v), r = 32:

    a = ln_1^b(x)                                  # the block's own frozen LayerNorm, all tokens
    z = ReLU(down^{m,b}(a))                        # (N, L, d) -> (N, L, r), one per branch
    s = ReLU(shared^b(z))                          # (N, L, r) -> (N, L, r), ONE per block, both towers
    u = up^{m,b}(s)                                # (N, L, r) -> (N, L, d), one per branch
    block output = x' + MLP(ln_2(x')) + alpha * u  # added once, after the MLP residual

Blocks: the shipped YAML adapts 0-based blocks 4..11 of 12-layer towers (`ADAPTER_START 5 ..
ADAPTER_END 12`, 1-based). For other depths the default is **the last K blocks of each tower, K =
round(2/3 * the shallower tower's depth)**, which is exactly 4..11 for 12 layers. The shared layer
pairs the k-th adapted text block with the k-th adapted vision block, so both towers adapt the same
number of blocks: ViT-L/14 (text 12, vision 24 blocks) gets text 4..11 and vision 16..23.
`blocks` (and optionally `vision_blocks`) override this with explicit 0-based indices.

Gradient-scale trick (default, `grad_scale=True`, [MMA:clip/gsl.py]): the adapter input passes an
identity whose backward multiplies the gradient by alpha, and alpha*u passes an identity whose
backward multiplies it by 1/alpha. The forward is unchanged and the gradient reaching the frozen
backbone (and anything upstream) is exact, but the adapter parameters receive 1/alpha = 1000x
their true gradient (an effective 1000x LR against a plain alpha-scaled adapter). The trick is a
training-time device: it is applied only while autograd records, so an eval/export forward
(`torch.no_grad()`) is plain tensor ops. With alpha = 0 the trick is undefined and skipped.

Text input: the fixed sentence "a photo of a {class}." (no learned tokens; EOT never moves).
Init: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every Linear, zero bias.

Parameters on ViT-B/16 (r = 32, 8 blocks):
    8 * [(512r+r) + (r*512+512) + (768r+r) + (r*768+768) + (r*r+r)] = 8 * 84,320 = 674,560
Export: W depends on class names + text and shared adapters (constant); the image graph is the
ViT with the vision and shared adapters (per-image compute, class-independent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..backbone import TowerHooks
from ..hooks import SideBranchHooks
from .base import HeadMethod, MethodConfig, MethodError, register_method
from .prompting import clean_classname


@dataclass(frozen=True)
class MMAConfig(MethodConfig):
    # 0-based blocks adapted in the text tower (and the vision tower unless `vision_blocks` is
    # given). None: the last round(2/3 * depth) blocks of each tower (4..11 for 12 layers).
    blocks: Optional[tuple[int, ...]] = None
    vision_blocks: Optional[tuple[int, ...]] = None  # None: same as `blocks` when that is given
    rank: int = 32  # bottleneck width r (ADAPTER_DIM)
    alpha: float = 0.001  # ADAPTER_SCALE of the shipped YAML (train.py's default 0.1 is overridden)
    grad_scale: bool = True  # the gradient-scale trick of clip/gsl.py (adapter grads x 1/alpha)
    text_template: str = "a photo of a {}."  # TEXT_CTX_INIT, the same for every dataset


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D401
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    return _ScaleGrad.apply(x, scale)


def default_adapter_blocks(depth: int, count: Optional[int] = None) -> tuple[int, ...]:
    """The last `count` blocks, default round(2/3 * depth): (4..11) for 12 layers, (1, 2) for 3."""
    k = max(1, round(2 * depth / 3)) if count is None else count
    return tuple(range(depth - k, depth))


def _linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


@register_method
class MMA(HeadMethod):
    name = "mma"
    Config = MMAConfig
    towers = ("text", "vision")
    summary = "multi-modal adapters on blocks 4..11 of both towers, shared middle layer (grad x 1/alpha)"

    def __init__(self, config: MMAConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        if config.rank < 1:
            raise MethodError(f"mma: rank must be >= 1, got {config.rank}")
        if config.alpha < 0:
            raise MethodError(f"mma: alpha must be >= 0, got {config.alpha}")
        n_text, n_vis = len(backbone.text_blocks), len(backbone.vision_blocks)
        if config.blocks is None:
            if config.vision_blocks is not None:
                raise MethodError("mma: `vision_blocks` needs `blocks` (the text side) as well")
            k = len(default_adapter_blocks(min(n_text, n_vis)))  # same count in both towers
            text_blocks, vis_blocks = default_adapter_blocks(n_text, k), default_adapter_blocks(n_vis, k)
        else:
            text_blocks = tuple(config.blocks)
            vis_blocks = tuple(config.vision_blocks if config.vision_blocks is not None else config.blocks)
        for tower, blocks, depth in (("text", text_blocks, n_text), ("vision", vis_blocks, n_vis)):
            if not blocks or len(set(blocks)) != len(blocks) or min(blocks) < 0 or max(blocks) >= depth:
                raise MethodError(f"mma: {tower} blocks {blocks} must be distinct indices in 0..{depth - 1}")
        if len(text_blocks) != len(vis_blocks):
            raise MethodError(
                f"mma: the shared layer pairs text and vision blocks, so both towers need the same number of "
                f"adapted blocks; got text {text_blocks} and vision {vis_blocks}"
            )
        self.text_blocks, self.vision_blocks = tuple(sorted(text_blocks)), tuple(sorted(vis_blocks))
        # level k (the k-th adapted block of each tower) -> adapter index
        self._level = {"text": {b: k for k, b in enumerate(self.text_blocks)},
                       "vision": {b: k for k, b in enumerate(self.vision_blocks)}}
        r, d_t, d_v, n = config.rank, backbone.text_width, backbone.vision_width, len(self.text_blocks)
        self.text_down = nn.ModuleList(_linear(d_t, r) for _ in range(n))
        self.text_up = nn.ModuleList(_linear(r, d_t) for _ in range(n))
        self.vision_down = nn.ModuleList(_linear(d_v, r) for _ in range(n))
        self.vision_up = nn.ModuleList(_linear(r, d_v) for _ in range(n))
        self.shared = nn.ModuleList(_linear(r, r) for _ in range(n))  # one per level, both towers

    # ---- the adapter ------------------------------------------------------------------------
    def _branch(self, tower: str, index: int, block: nn.Module, x_in: Tensor) -> Tensor:
        """alpha * adapter(ln_1(x_in)); x_in (N, L, d) -> (N, L, d)."""
        k = self._level[tower][index]
        down, up = (self.text_down[k], self.text_up[k]) if tower == "text" else (self.vision_down[k], self.vision_up[k])
        alpha = self.config.alpha
        trick = self.config.grad_scale and alpha > 0 and torch.is_grad_enabled()
        a = block.ln_1(x_in)  # (N, L, d) frozen LayerNorm of the block input
        if trick:
            a = scale_grad(a, alpha)
        a = a.to(down.weight.dtype)
        z = torch.relu(down(a))  # (N, L, r)
        s = torch.relu(self.shared[k](z))  # (N, L, r)
        out = alpha * up(s)  # (N, L, d)
        if trick:
            out = scale_grad(out, 1.0 / alpha)
        return out.to(x_in.dtype)

    def tower_hooks(self, tower: str) -> TowerHooks:
        blocks = self.text_blocks if tower == "text" else self.vision_blocks
        return SideBranchHooks(lambda i, block, x: self._branch(tower, i, block, x), set(blocks))

    # ---- HeadMethod -------------------------------------------------------------------------
    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        texts = [self.config.text_template.format(clean_classname(c)) for c in classnames]
        tokens = self.backbone.tokenize(texts).to(self.shared[0].weight.device)
        return self.backbone.encode_text(tokens, self.tower_hooks("text"))

    def image_hooks(self, task: int = 0) -> TowerHooks:
        return self.tower_hooks("vision")
