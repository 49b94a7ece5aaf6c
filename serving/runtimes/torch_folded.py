"""A PyTorch runtime over folded heads: what a bundle's graphs compute, run in PyTorch.

`export.fold.fold_heads` turns a head into image modules holding only constants (class matrix,
prompt bank or adapters). On CUDA this runtime runs them in fp16 and replays one CUDA graph per
(graph, batch bucket): the path `bench/gpu/bench_cuda.py` measured (ViT-B/16 on an H100: 4.5x fp32
eager at batch 1, 52% of the fp16 matmul ceiling at batch 256, cosine 0.99999 vs fp32). Batches are
padded up to a power of two so at most log2(max_batch)+1 graphs are captured per image graph. On the
CPU it runs the same modules in fp32 without graphs (the reference the tests compare).
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .base import Runtime, RuntimeError_
from .bundle import backbone_identity, index_tasks, zero_shot_path

log = logging.getLogger("clipheads.serving")


class CudaGraphed:
    """Replays one CUDA graph per input shape; inputs are copied into static buffers. The returned
    tensors are the graph's static outputs: copy them before the next call."""

    def __init__(self, module):
        self.module = module
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, pixels, task_index):
        import torch

        key = tuple(pixels.shape)
        if key not in self.graphs:
            sp, st = pixels.clone(), task_index.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream before capture
                for _ in range(2):
                    self.module(sp, st)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.module(sp, st)
            self.graphs[key] = (graph, sp, st, out)
        graph, sp, st, out = self.graphs[key]
        sp.copy_(pixels)
        st.copy_(task_index)
        graph.replay()
        return out


def bucket(n: int) -> int:
    """The power of two a batch of n is padded to (CUDA graphs are captured per shape)."""
    return 1 << max(0, (n - 1).bit_length())


class FoldedTorchRuntime(Runtime):
    def __init__(self, head_path: str | os.PathLike, device: Optional[str] = None, precision: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None, weights: Optional[str] = None):
        super().__init__()
        import torch

        from clipheads.export.fold import FoldError, fold_heads
        from clipheads.training.artifact import load_head

        self._torch = torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = device.startswith("cuda")
        precision = precision or ("fp16" if on_cuda else "fp32")
        if precision not in ("fp32", "fp16"):
            raise RuntimeError_(f"precision must be fp32 or fp16, got {precision!r}")
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise RuntimeError_("CUDA graphs need a CUDA device")
        self.device, self.precision = device, precision
        self.name = f"torch-folded-{'cuda' if on_cuda else 'cpu'}-{precision}"
        art = load_head(Path(head_path))
        head = art.build(device=device, weights_override=weights, log=log.info).eval()  # weights: moved backbone
        self.backbone_weights = head.backbone.describe_weights()  # which weights file it used
        try:
            plan = fold_heads([head])
        except FoldError as err:
            raise RuntimeError_(str(err)) from None
        self._backbone = plan.backbone
        self._text = plan.text.eval()
        self.preprocess = plan.preprocess.to_json()
        self.logit_scale = float(plan.logit_scale)
        self.identity = backbone_identity(art.backbone)
        self._encoders = {}
        for g in plan.graphs:
            enc = g.encoder.to(device).eval()
            if precision == "fp16":
                enc = copy.deepcopy(enc).half()  # the text tower (shared backbone) stays fp32
            self._encoders[g.name] = CudaGraphed(enc) if self.cuda_graphs else enc
        self._path_keys, self.tasks = index_tasks([t.to_json() for t in plan.tasks])  # as in a bundle
        self.paths = [f"{g}#{k}" for g, k in self._path_keys]
        self.base_path = zero_shot_path(self._path_keys, next((g.name for g in plan.graphs if g.kind == "plain"), None))

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        fname, k = self._path_keys[path]
        n = len(pixels)
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        if self.cuda_graphs and bucket(n) != n:  # pad to the captured shape; padded rows are dropped
            x = np.concatenate([x, np.zeros((bucket(n) - n,) + x.shape[1:], np.uint8)])
        with self._lock, torch.inference_mode():
            px = torch.from_numpy(x).to(self.device, non_blocking=True)
            ti = torch.full((len(x),), k, dtype=torch.long, device=self.device)
            logits, feats = self._encoders[fname](px, ti)
            return logits[:n].float().cpu().numpy(), feats[:n].float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            tokens = self._backbone.tokenize(list(texts)).to(self.device)
            length = self._backbone.trimmed_length(tokens)  # the used length: same features (text_length.py)
            if length is not None and length < tokens.shape[1]:
                tokens = tokens[:, :length]
            return self._text(tokens).float().cpu().numpy()
