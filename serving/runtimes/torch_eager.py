"""Eager PyTorch over a head artifact: the fallback runtime and the reference for parity."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from .base import Runtime, TaskInfo
from .bundle import backbone_identity

log = logging.getLogger("clipheads.serving")


class TorchRuntime(Runtime):
    """Runs a head artifact eagerly: the fallback and the reference for parity."""

    def __init__(self, head_path: str | os.PathLike, device: Optional[str] = None, weights: Optional[str] = None,
                 backbone=None):
        """`backbone`: an open Backbone to build the head on (checked against its record) instead of
        opening the record's weights; `device` is then the backbone's."""
        super().__init__()
        import torch

        from clipheads.training.artifact import load_head

        self._torch = torch
        device = str(backbone.device) if backbone is not None else device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        self.name = f"torch-{'cuda' if device.startswith('cuda') else 'cpu'}"
        art = load_head(head_path)
        head = art.build(backbone, device=device, weights_override=weights, log=log.info).eval()  # weights: moved backbone
        self.head = head
        self.backbone_weights = head.backbone.describe_weights()  # which weights file it used
        bb = head.backbone
        pre = art.preprocess
        self.preprocess = pre.to_json()
        self._mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.logit_scale = float(bb.logit_scale.detach().cpu())
        self.identity = backbone_identity(art.backbone)
        has_vision = "vision" in type(head).towers or not head.foldable
        self.paths, self.tasks, self._path_task = [], {}, []
        self._class_w: dict[int, "torch.Tensor"] = {}
        with torch.no_grad():
            for i, spec in enumerate(head.tasks):
                if has_vision or not self.paths:
                    self.paths.append(f"head#{i}")
                    self._path_task.append(i)
                p = len(self.paths) - 1 if has_vision else 0
                start = sum(len(t.classnames) for t in self.tasks.values() if t.path == p)
                self.tasks[spec.name] = TaskInfo(
                    spec.name, tuple(spec.classnames), p, (start, start + len(spec.classnames)), head.templates_for(i)
                )
                if head.foldable:
                    self._class_w[i] = head.text_features(spec.classnames, i).float()  # (C, E)
        self._task_index = {spec.name: i for i, spec in enumerate(head.tasks)}
        # zero-shot / few-shot features: path 0, as in this head's bundle (bundle.zero_shot_path): the
        # plain tower for text-only heads, the head's own image tower when it changes that tower
        self.base_path = 0

    def _pixels(self, pixels: np.ndarray):
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).float().div_(255.0)
        return (x - self._mean) / self._std

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        head = self.head
        with self._lock, torch.no_grad():
            x = self._pixels(pixels)
            ti = self._path_task[path]
            f = head.image_features(x, ti).float()  # (N, E)
            cols = []
            for name, t in self.tasks.items():
                if t.path != path:
                    continue
                i = self._task_index[name]
                if i in self._class_w:
                    cols.append(self.logit_scale * f @ self._class_w[i].t())
                else:  # image-conditioned heads (CoCoOp): the method computes its own logits
                    cols.append(head.logits(x, i).float())
            return torch.cat(cols, dim=1).cpu().numpy(), f.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        bb = self.head.backbone
        with self._lock, torch.no_grad():
            tokens = bb.tokenize(list(texts)).to(self.device)
            return bb.encode_text(tokens, trim=True).float().cpu().numpy()  # the used length: same features


