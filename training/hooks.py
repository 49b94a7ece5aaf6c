"""Reusable tower hooks: learned prompt tokens (shallow + deep) and parallel side branches.

Prompt tensors may be shared by the whole batch, shape (P, D), or chosen per sample, shape
(N, P, D). The second form is what export uses to run a mixed-task batch in one call: it
gathers each sample's prompts from a stacked per-task bank.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .backbone import TowerHooks


def _per_sample(prompt: Tensor, x: Tensor) -> Tensor:
    """(P, D) or (N, P, D) -> (N, P, D) matching x's batch, dtype and device."""
    prompt = prompt.to(dtype=x.dtype, device=x.device)
    if prompt.dim() == 2:
        return prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
    return prompt


class PromptHooks(TowerHooks):
    """Shallow prompts appended at the input and/or deep prompts overwriting their slots.

    Two placements exist in the papers (METHODS.md 0.2):
    * vision (`slot_start=None`): the shallow prompt is appended after the patches before
      `ln_pre`; deep prompts at block i overwrite the *last* P tokens.
    * text (`slot_start=k`): the prompt already sits at positions k..k+P-1 (spliced into the
      word embeddings); deep prompts at block i overwrite those positions.
    Blocks with no deep prompt carry whatever the slots hold.
    """

    def __init__(
        self,
        deep: Optional[Mapping[int, Tensor]] = None,
        shallow: Optional[Tensor] = None,
        slot_start: Optional[int] = None,
    ):
        self.deep = dict(deep or {})
        self.shallow = shallow
        self.slot_start = slot_start

    def on_input(self, x: Tensor) -> Tensor:
        if self.shallow is None:
            return x
        if self.slot_start is not None:
            return self._overwrite(x, self.shallow)
        return torch.cat([x, _per_sample(self.shallow, x)], dim=1)  # (N, L+P, D)

    def before_block(self, index: int, x: Tensor) -> Tensor:
        prompt = self.deep.get(index)
        if prompt is None:
            return x
        return self._overwrite(x, prompt)

    def _overwrite(self, x: Tensor, prompt: Tensor) -> Tensor:
        p = _per_sample(prompt, x)  # (N, P, D)
        n = p.shape[1]
        if self.slot_start is None:
            return torch.cat([x[:, :-n], p], dim=1)
        s = self.slot_start
        return torch.cat([x[:, :s], p, x[:, s + n :]], dim=1)


class SideBranchHooks(TowerHooks):
    """Adds `branch(index, block, x_in)` to the output of the listed blocks (adapters)."""

    def __init__(self, branch: Callable[[int, nn.Module, Tensor], Optional[Tensor]], blocks: set[int]):
        self.branch = branch
        self.blocks = set(blocks)

    def after_block(self, index: int, block: nn.Module, x_in: Tensor, x_out: Tensor) -> Tensor:
        if index not in self.blocks:
            return x_out
        return x_out + self.branch(index, block, x_in)
