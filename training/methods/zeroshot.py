"""Zero-shot CLIP: the class matrix from hand-crafted templates; nothing is trained."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import HeadMethod, MethodConfig, register_method

# The 7-template ensemble CoOp's ZeroshotCLIP2 uses (METHODS.md 1).
IMAGENET_TEMPLATES_SELECT = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    # None: each task's own templates (a single per-dataset template, or any ensemble given with
    # the task). A tuple here overrides them for every task, e.g. the 80 ImageNet templates.
    templates: Optional[tuple[str, ...]] = None


@register_method
class ZeroShot(HeadMethod):
    name = "zeroshot"
    Config = ZeroShotConfig
    towers = ()
    summary = "CLIP with hand-crafted templates (single, per-dataset, or ensembles)"

    def templates_for(self, task: int = 0) -> tuple[str, ...]:
        return tuple(self.config.templates or self.tasks[task].templates)
