"""VPT on CLIP (Jia et al., ECCV 2022; the MaPLe repo's "Deep Vision Prompting"), METHODS.md 3.2.

Vision tower only:

    block 0 (input)   n prompt tokens P^0 (n, D_v) appended after the patches, after the
                      positional embedding (they get none), before ln_pre
    blocks 1..depth-1 the last n tokens are overwritten by P^b (n, D_v) (deep variant)
    blocks depth..    the slots are carried; they are dropped before pooling (CLS via ln_post)

depth = 1 is shallow VPT. Init N(0, 0.02^2) [MAPLE:clip/model.py] (not the original VPT's
uniform(-v, v)). Depth is clipped to the tower depth. Loss: CE only.

Text side: frozen CLIP features of the single generic template "a photo of a {}." for every
dataset (`text_template`; not the per-dataset templates) [MAPLE:trainers/vpt.py FixedEmbeddings].
They are computed once per class list and cached (not saved: they follow from the backbone).

Parameters on ViT-B/16: n * 768 * depth = 8 * 768 * 12 = 73,728 (deep); shallow 768 * n.
Export: W constant (class names only); image graph = ViT + constant prompt tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..backbone import TowerHooks
from ..hooks import PromptHooks
from .base import HeadMethod, MethodConfig, MethodError, register_method, template_class_embeddings
from .maple import clip_depth


@dataclass(frozen=True)
class VPTConfig(MethodConfig):
    n_ctx: int = 8  # n: prompt tokens per prompted block (VPT N_CTX_VISION)
    depth: int = 12  # blocks 0..depth-1 get new prompts; 1 = shallow VPT (PROMPT_DEPTH_VISION)
    init_std: float = 0.02  # prompts ~ N(0, init_std^2)
    text_template: str = "a photo of a {}."  # frozen classifier template, the same for every dataset


@register_method
class VPT(HeadMethod):
    name = "vpt"
    Config = VPTConfig
    towers = ("vision",)
    summary = "visual prompt tokens (shallow or deep, n=8 x 12 blocks); frozen 'a photo of a {}.' classifier"

    def __init__(self, config: VPTConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        if config.n_ctx < 1:
            raise MethodError(f"vpt: n_ctx must be >= 1, got {config.n_ctx}")
        depth = clip_depth(self.name, config.depth, backbone.vision_blocks)
        self.prompts = nn.Parameter(torch.randn(depth, config.n_ctx, backbone.vision_width) * config.init_std)
        self._class_cache: dict[tuple, Tensor] = {}  # (classnames, device, dtype) -> (C, E)

    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        scale = self.backbone.logit_scale  # its device and dtype: fp16 training must not leave fp16 weights behind
        key = (tuple(classnames), str(scale.device), scale.dtype)
        if key not in self._class_cache:
            with torch.no_grad():
                w = template_class_embeddings(self.backbone, key[0], (self.config.text_template,))
            self._class_cache[key] = w
        return self._class_cache[key]

    def image_hooks(self, task: int = 0) -> TowerHooks:
        p = self.prompts.clone()  # (depth, n, D_v); a snapshot: plain constants under no_grad
        return PromptHooks(shallow=p[0], deep={b: p[b] for b in range(1, p.shape[0])})
