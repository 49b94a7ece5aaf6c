"""The one interface every runtime implements; the front, the encoder and batch scoring see only it.

* `paths`               distinct image paths (graph, task_index). Tasks whose image path is the
                        same share one encoder pass; `TaskInfo.path` + `logit_slice` say where a
                        task's logits live in that pass's output.
* `run_path(p, pixels, alongside=False)` (N, 3, S, S) uint8 -> logits (N, C_path) float32, features (N, E) float32
* `classify(pixels, task_names)` -> {task: logits (N, C)}: one pass per distinct path
* `encode_images(pixels)` -> (N, E) features on the base path (zero-shot / few-shot scoring)
* `encode_texts(texts)` -> (N, E) normalized text features (for request-time labels)

Implementations: `onnx_runtime.OnnxRuntime` (bundle, CPU/CUDA), `tensorrt_runtime.TensorRTRuntime`
(bundle engines), `torch_eager.TorchRuntime` (head file, the reference) and
`torch_folded.FoldedTorchRuntime` (head file folded as a bundle would be; fp16 + CUDA graphs on a
GPU). `select.open_runtime` picks one.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


class RuntimeError_(RuntimeError):
    """A runtime cannot be opened (missing files, bad manifest, unavailable backend)."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    classnames: tuple[str, ...]
    path: int  # index into Runtime.paths
    logit_slice: tuple[int, int]  # columns of this task in the path's logits
    templates: tuple[str, ...] = ("a photo of a {}.",)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ranked(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict]:
    """The top `k` labels of one probability row, as every answer gives them (HTTP, Predictor):
    scores rounded to 6 digits, ties in label order."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "score": round(float(probs[i]), 6)} for i in order]


class Runtime(ABC):
    name: str = "?"
    tasks: dict[str, TaskInfo]
    paths: list[str]  # human-readable path keys, e.g. "image_0.onnx#0"
    preprocess: dict  # {image_size, mean, std, resize, crop}
    identity: str  # backbone fingerprint: few-shot tasks persisted under one identity only
    base_path: int = 0
    # passes the encoder may run at once (run_path's `alongside`); > 1 only for OnnxRuntime, opt-in
    concurrent_passes: int = 1
    logit_scale: float = 100.0
    has_text: bool = True  # False: a bundle without a text graph (no request-time labels)

    def __init__(self) -> None:
        self._lock = threading.Lock()  # sessions/modules are driven from one thread at a time

    @abstractmethod
    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) uint8 -> (logits (N, C_path), features (N, E)), float32. `alongside`: another
        pass runs at the same time (the encoder sets it only where `concurrent_passes` > 1)."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(T,) strings -> (T, E) normalized float32."""

    # ---- shared -----------------------------------------------------------------------------
    def paths_for(self, task_names: Sequence[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for t in task_names:
            groups.setdefault(self.tasks[t].path, []).append(t)
        return groups

    def classify(self, pixels: np.ndarray, task_names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        names = list(task_names) if task_names is not None else list(self.tasks)
        out: dict[str, np.ndarray] = {}
        for path, group in self.paths_for(names).items():
            logits, _ = self.run_path(path, pixels)
            for t in group:
                a, b = self.tasks[t].logit_slice
                out[t] = logits[:, a:b]
        return out

    def encode_images(self, pixels: np.ndarray, path: Optional[int] = None) -> np.ndarray:
        return self.run_path(self.base_path if path is None else path, pixels)[1]

    def warmup(self) -> None:
        """One pass on every path and the text tower; raises if the runtime is broken."""
        s = int(self.preprocess["image_size"])
        x = np.full((1, 3, s, s), 127, np.uint8)
        for p in range(len(self.paths)):
            logits, feats = self.run_path(p, x)
            if not (np.isfinite(logits).all() and np.isfinite(feats).all()):
                raise RuntimeError_(f"warm-up produced non-finite outputs on path {self.paths[p]}")
        if self.has_text:
            self.encode_texts(["a photo of a thing."])

    def describe(self) -> dict:
        return {
            "runtime": self.name,
            "identity": self.identity,
            "image_size": int(self.preprocess["image_size"]),
            "has_text": self.has_text,
            "paths": list(self.paths),
            "tasks": [{"name": t.name, "labels": list(t.classnames), "path": t.path} for t in self.tasks.values()],
        }
