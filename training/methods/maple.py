"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023), METHODS.md 4.

n prompt tokens per branch at the inputs of blocks 0..J-1 of both towers; every vision prompt is
a linear projection of the *same-depth* text prompt (text -> vision coupling only):

    block 0 (input)   text: ctx P_t^0 (n, D_t) at positions 1..n   vision: F_0(P_t^0) appended after
                      (right after SOT)                                    the patches, before ln_pre
    blocks 1..J-1     text: slots overwritten by P_t^b (n, D_t)    vision: last n tokens <- F_b(P_t^b)
    blocks J..        both: slots carried
    F_b = Linear(D_t -> D_v), one per depth (J in total); no free vision-prompt parameters.

Init: ctx = word embeddings of the first n tokens of "a photo of a" ("a", "photo"); the placeholder
sentence is the whole phrase, so the fixed tokens "of a" stay between the learned context and the
class name (METHODS.md 11.1). Deep text prompts ~ N(0, 0.02^2); F_b PyTorch default init, with
F_1..F_{J-1} starting as copies of ONE Linear (identical at init, as the official `_get_clones`;
F_0 is drawn separately) [MAPLE:trainers/maple.py].
Loss: CE only. J is clipped to the shallower tower's depth (tiny test models).

Parameters on ViT-B/16: J * (n*512 + 512*768 + 768) = 9 * 395,008 = 3,555,072 (n=2, J=9);
1,185,024 for the cross-dataset/DG setting J=3.
Export: W depends on class names + text prompts; the vision prompts are functions of text-side
parameters only, so `image_hooks()` under `torch.no_grad()` gives J constant (n, D_v) tensors.

`DeepTextPrompts` (ctx + deep text prompts + placeholder sentences) is the text side shared with
IVLP and COMMA.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..backbone import Backbone, TowerHooks
from ..hooks import PromptHooks
from .base import HeadMethod, MethodConfig, MethodError, register_method
from .prompting import TextPromptBuilder


def clip_depth(method: str, depth: int, *towers: nn.ModuleList) -> int:
    """`depth` prompted blocks, clipped to the shallowest tower (a 3-block test model takes 3)."""
    if depth < 1:
        raise MethodError(f"{method}: prompt depth must be >= 1 (1 = input only), got {depth}")
    return min([depth] + [len(t) for t in towers])


class DeepTextPrompts(nn.Module):
    """Text prompts at the inputs of blocks 0..J-1: ctx spliced into the placeholder sentence at
    positions 1..n, then positions 1..n overwritten at the inputs of blocks 1..J-1."""

    def __init__(self, backbone: Backbone, n_ctx: int, depth: int, ctx_init: Optional[str], init_std: float):
        super().__init__()
        if n_ctx < 1:
            raise MethodError(f"n_ctx must be >= 1, got {n_ctx}")
        object.__setattr__(self, "backbone", backbone)  # frozen; not a submodule
        self.builder = TextPromptBuilder(backbone, n_ctx, ctx_init)
        width = backbone.text_width
        init = self.builder.init_vectors()  # (n, D_t) or None
        if init is None:
            init = torch.randn(n_ctx, width) * init_std
        self.ctx = nn.Parameter(init.float())  # P_t^0: (n, D_t)
        self.deep = nn.Parameter(torch.randn(depth - 1, n_ctx, width) * init_std)  # P_t^1..P_t^{J-1}

    @property
    def depth(self) -> int:
        return self.deep.shape[0] + 1

    def layers(self) -> list[Tensor]:
        """[P_t^0, ..., P_t^{J-1}], each (n, D_t)."""
        return [self.ctx] + list(self.deep.unbind(0))

    def hooks(self) -> PromptHooks:
        return PromptHooks(deep={b: self.deep[b - 1] for b in range(1, self.depth)}, slot_start=1)

    def encode(self, classnames: Sequence[str], hooks: Optional[TowerHooks] = None, return_tokens: bool = False):
        """(C, E) normalized class embeddings (and the last block's tokens (C, L, D_t))."""
        tokens, emb = self.builder.embed(classnames, self.ctx)  # (C, L), (C, L, D_t)
        return self.backbone.encode_text(tokens, self.hooks() if hooks is None else hooks, embeddings=emb, return_tokens=return_tokens)


@dataclass(frozen=True)
class MaPLeConfig(MethodConfig):
    n_ctx: int = 2  # n: prompt tokens per branch and prompted block (N_CTX)
    depth: int = 9  # J: blocks 0..J-1 get prompts (PROMPT_DEPTH; 3 for cross-dataset/DG)
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT; None: ctx ~ N(0, init_std^2) with "X X"
    init_std: float = 0.02  # deep text prompts ~ N(0, init_std^2)


@register_method
class MaPLe(HeadMethod):
    name = "maple"
    Config = MaPLeConfig
    towers = ("text", "vision")
    summary = "deep text prompts; vision prompts = per-depth Linear(text prompt) (J=9)"

    def __init__(self, config: MaPLeConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        depth = clip_depth(self.name, config.depth, backbone.text_blocks, backbone.vision_blocks)
        self.text = DeepTextPrompts(backbone, config.n_ctx, depth, config.ctx_init, config.init_std)
        d_t, d_v = backbone.text_width, backbone.vision_width
        deep = nn.Linear(d_t, d_v)  # the deep projections start as copies of this one (official init)
        self.proj = nn.ModuleList([nn.Linear(d_t, d_v)] + [copy.deepcopy(deep) for _ in range(depth - 1)])

    def vision_prompts(self) -> list[Tensor]:
        """[F_b(P_t^b)] for b = 0..J-1, each (n, D_v): class- and image-independent."""
        return [f(p) for f, p in zip(self.proj, self.text.layers())]

    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        return self.text.encode(classnames)

    def image_hooks(self, task: int = 0) -> TowerHooks:
        vis = self.vision_prompts()
        return PromptHooks(shallow=vis[0], deep={b: vis[b] for b in range(1, len(vis))})
