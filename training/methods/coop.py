"""CoOp (Zhou et al., IJCV 2022): M learned context vectors in front of the class name.

Text encoder input only: `[SOT] ctx_1..ctx_M classname . [EOT]` (or the class in the middle or
front). Unified context is M x D_t; class-specific context (CSC) is C x M x D_t.
Parameters on ViT-B/16: M=16 -> 8,192; M=4 ("a photo of a") -> 2,048.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import HeadMethod, MethodConfig, MethodError, register_method
from .prompting import TextPromptBuilder


@dataclass(frozen=True)
class CoOpConfig(MethodConfig):
    n_ctx: int = 16
    ctx_init: Optional[str] = None  # e.g. "a photo of a" (then n_ctx <= its tokens); None: N(0, 0.02^2)
    class_token_position: str = "end"  # end | middle | front
    class_specific: bool = False  # CSC: one context per class of the (single) task
    init_std: float = 0.02


@register_method
class CoOp(HeadMethod):
    name = "coop"
    Config = CoOpConfig
    towers = ("text",)
    summary = "learned text context vectors (unified or class-specific)"

    def __init__(self, config: CoOpConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        self.prompts = TextPromptBuilder(backbone, config.n_ctx, config.ctx_init, config.class_token_position)
        width = backbone.text_width
        init = self.prompts.init_vectors()
        if config.class_specific:
            if len(self.tasks) != 1:
                raise MethodError("class-specific context (CSC) is defined for a single task")
            shape = (len(self.tasks[0].classnames), config.n_ctx, width)
            init = None if init is None else init.unsqueeze(0).expand(shape).clone()
        else:
            shape = (config.n_ctx, width)
        if init is None:
            init = torch.empty(shape).normal_(0.0, config.init_std)
        self.ctx = nn.Parameter(init.float())  # (M, D_t) or (C, M, D_t)

    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        if self.config.class_specific and tuple(classnames) != self.tasks[0].classnames:
            raise MethodError("a class-specific CoOp head only knows the classes it was trained on")
        tokens, emb = self.prompts.embed(classnames, self.ctx)  # (C, L), (C, L, D_t)
        return self.backbone.encode_text(tokens, embeddings=emb)
