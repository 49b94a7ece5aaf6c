"""IVLP: Independent Vision-Language Prompting (the MaPLe paper's ablation), METHODS.md 3.2 / 8.

Deep prompts in both towers with *no* coupling between them (MaPLe without the projections):

    text   ctx P_t^0 (n_t, D_t) at positions 1..n_t, init "a photo of a" (first n_t tokens; the
           rest of the phrase stays fixed, as in MaPLe); positions 1..n_t overwritten by free
           P_t^b ~ N(0, 0.02^2) at the inputs of blocks 1..text_depth-1
    vision P_v^0 (n_v, D_v) appended after the patches before ln_pre; the last n_v tokens
           overwritten by free P_v^b at the inputs of blocks 1..vision_depth-1; all ~ N(0, 0.02^2)

Depths are clipped to the tower depth. Loss: CE only.
Parameters on ViT-B/16 (2+2 tokens, 12 layers each): 2*512*12 + 2*768*12 = 30,720.
Export: W depends on class names + text prompts; vision prompts are constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..backbone import TowerHooks
from ..hooks import PromptHooks
from .base import HeadMethod, MethodConfig, MethodError, register_method
from .maple import DeepTextPrompts, clip_depth


@dataclass(frozen=True)
class IVLPConfig(MethodConfig):
    n_ctx_text: int = 2  # N_CTX_TEXT
    n_ctx_vision: int = 2  # N_CTX_VISION
    text_depth: int = 12  # PROMPT_DEPTH_TEXT: blocks 0..depth-1 (1 = input only)
    vision_depth: int = 12  # PROMPT_DEPTH_VISION
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT; None: "X X" + N(0, init_std^2)
    init_std: float = 0.02  # deep text prompts and all vision prompts ~ N(0, init_std^2)


@register_method
class IVLP(HeadMethod):
    name = "ivlp"
    Config = IVLPConfig
    towers = ("text", "vision")
    summary = "independent deep text and vision prompts (2+2 tokens, 12 layers)"

    def __init__(self, config: IVLPConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        if config.n_ctx_vision < 1:
            raise MethodError(f"ivlp: n_ctx_vision must be >= 1, got {config.n_ctx_vision}")
        t_depth = clip_depth(self.name, config.text_depth, backbone.text_blocks)
        v_depth = clip_depth(self.name, config.vision_depth, backbone.vision_blocks)
        self.text = DeepTextPrompts(backbone, config.n_ctx_text, t_depth, config.ctx_init, config.init_std)
        shape = (v_depth, config.n_ctx_vision, backbone.vision_width)
        self.vision = nn.Parameter(torch.randn(shape) * config.init_std)  # P_v^0..P_v^{depth-1}

    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        return self.text.encode(classnames)

    def image_hooks(self, task: int = 0) -> TowerHooks:
        vis = self.vision.clone()  # a snapshot: plain constants when called under no_grad
        return PromptHooks(shallow=vis[0], deep={b: vis[b] for b in range(1, vis.shape[0])})
