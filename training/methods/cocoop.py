"""CoCoOp: Conditional Context Optimization (Zhou et al., CVPR 2022), METHODS.md 2.2.

CoOp's M context vectors plus a Meta-Net that makes them depend on the image:

    f      = normalize(CLIP image feature)              (B, E)     plain image tower
    pi(f)  = Linear(E/16 -> D_t)(ReLU(Linear(E -> E/16)(f)))   (B, D_t)
    ctx_i(x) = ctx_i + pi(f)                            every context vector, per image
    logits[b, c] = exp(logit_scale) * cos(f_b, text(ctx(x_b), class c))

The text encoder runs once per (image, class) pair, B x C sequences. Context: M = 4 from
"a photo of a" (the whole phrase learned). Meta-Net hidden width E // 16 (32 for E = 512),
PyTorch default init [COOP:trainers/cocoop.py]. Loss: CE only.

Parameters on ViT-B/16: 4*512 + (512*32+32) + (32*512+512) = 35,360.

NOT foldable: the class matrix depends on the image, so there is no constant W. `text_features`
refuses; `logits` does the per-image work; an exporter must refuse this head. It needs no ViT
(the image tower is only read), so it runs on ResNet backbones too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import HeadMethod, MethodConfig, MethodError, register_method
from .prompting import TextPromptBuilder


@dataclass(frozen=True)
class CoCoOpConfig(MethodConfig):
    n_ctx: int = 4  # M (N_CTX)
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT; None: "X X X X" + N(0, init_std^2)
    init_std: float = 0.02
    meta_reduction: int = 16  # Meta-Net hidden width = E // meta_reduction (vis_dim // 16)
    # Memory knob, not a paper hyper-parameter: images are scored in chunks of
    # max(1, max_text_sequences // C), each chunk one text pass of chunk x C sequences.
    max_text_sequences: int = 4096


@register_method
class CoCoOp(HeadMethod):
    name = "cocoop"
    Config = CoCoOpConfig
    towers = ("text",)
    foldable = False
    summary = "image-conditioned text context (Meta-Net); NOT foldable: text encoder runs per image x class"

    def __init__(self, config: CoCoOpConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        self.prompts = TextPromptBuilder(backbone, config.n_ctx, config.ctx_init)
        width, embed = backbone.text_width, backbone.embed_dim
        hidden = embed // config.meta_reduction
        if hidden < 1:
            raise MethodError(f"cocoop: embed dim {embed} // meta_reduction {config.meta_reduction} is 0")
        init = self.prompts.init_vectors()
        if init is None:
            init = torch.randn(config.n_ctx, width) * config.init_std
        self.ctx = nn.Parameter(init.float())  # (M, D_t)
        self.meta_net = nn.Sequential(nn.Linear(embed, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))

    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        raise MethodError(
            "cocoop has no image-independent class matrix: its context depends on each image "
            "(Meta-Net), so it cannot be folded into a constant W; use logits(images, ...)"
        )

    def conditional_text_features(self, image_features: Tensor, classnames: Sequence[str]) -> Tensor:
        """(B, E) normalized image features -> (B, C, E) normalized per-image class embeddings."""
        tokens, emb = self.prompts.embed(classnames, self.ctx)  # (C, L), (C, L, D_t)
        slots = self.prompts.placeholders(classnames).slots.to(emb.device)  # (C, M)
        c, length, _ = emb.shape
        mask = torch.zeros(c, length, 1, dtype=emb.dtype, device=emb.device)
        mask[torch.arange(c, device=emb.device).unsqueeze(1), slots] = 1.0  # 1 at context slots
        bias = self.meta_net(image_features.to(emb.dtype))  # (B, D_t)
        b = bias.shape[0]
        emb = emb.unsqueeze(0) + mask.unsqueeze(0) * bias[:, None, None, :]  # (B, C, L, D_t)
        feats = self.backbone.encode_text(tokens.repeat(b, 1), embeddings=emb.reshape(b * c, length, -1))
        return feats.view(b, c, -1)  # (B, C, E)

    def logits(self, images: Tensor, task: int = 0, classnames: Optional[Sequence[str]] = None) -> Tensor:
        names = classnames if classnames is not None else self.tasks[task].classnames
        f = self.image_features(images, task)  # (B, E) plain CLIP, normalized
        step = max(1, self.config.max_text_sequences // max(len(names), 1))
        out = []
        for part in f.split(step):  # (b, E) -> (b, C)
            w = self.conditional_text_features(part, names)  # (b, C, E)
            out.append(torch.einsum("be,bce->bc", part, w))
        return self.backbone.logit_scale * torch.cat(out)
