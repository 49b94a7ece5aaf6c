"""Runtime outputs -> output columns: one pass per distinct image path, then top-k per task."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def run_batch(runtime, pixels: np.ndarray, tasks: Sequence[str], embeddings: bool) -> tuple[dict, Optional[np.ndarray]]:
    """One encoder pass per distinct image path: {task: logits (N, C)}, features (N, E) or None."""
    logits: dict[str, np.ndarray] = {}
    feats = None
    for path, group in runtime.paths_for(tasks).items():
        lg, f = runtime.run_path(path, pixels)
        if embeddings and path == runtime.base_path:
            feats = f
        for t in group:
            a, b = runtime.tasks[t].logit_slice
            logits[t] = lg[:, a:b]
    if embeddings and feats is None:
        feats = runtime.encode_images(pixels)
    if feats is not None:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return logits, feats


class Columns:
    """Accumulates one shard's output columns (top-k of each task) batch by batch."""

    def __init__(self, tasks: dict[str, list[str]], top_k: int, embeddings: bool):
        self.tasks = tasks
        self.top_k = top_k
        self.embeddings = embeddings
        self.cols: dict[str, list] = {}
        self.reset()

    def reset(self) -> None:
        self.cols = {"index": [], "path": []}
        for t in self.tasks:
            self.cols[f"{t}.label"], self.cols[f"{t}.score"] = [], []
            if self.top_k > 1:
                self.cols[f"{t}.top_labels"], self.cols[f"{t}.top_scores"] = [], []
        if self.embeddings:
            self.cols["embedding"] = []

    def add(self, indices: Sequence[int], keys: Sequence[str], logits: dict[str, np.ndarray], feats) -> None:
        self.cols["index"].extend(indices)
        self.cols["path"].extend(keys)
        for t, labels in self.tasks.items():
            probs = softmax(logits[t])
            k = min(self.top_k, probs.shape[1])
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
            top = np.take_along_axis(probs, order, axis=1)
            names = np.asarray(labels, dtype=object)[order]
            self.cols[f"{t}.label"].extend(names[:, 0].tolist())
            self.cols[f"{t}.score"].append(top[:, 0])
            if self.top_k > 1:
                self.cols[f"{t}.top_labels"].extend(names.tolist())
                self.cols[f"{t}.top_scores"].extend(top.tolist())
        if self.embeddings:
            self.cols["embedding"].extend(feats.astype(np.float32).tolist())

    def schema(self):
        import pyarrow as pa

        fields = [pa.field("index", pa.int64()), pa.field("path", pa.string())]
        for t in self.tasks:
            fields += [pa.field(f"{t}.label", pa.string()), pa.field(f"{t}.score", pa.float32())]
            if self.top_k > 1:
                fields += [pa.field(f"{t}.top_labels", pa.list_(pa.string())),
                           pa.field(f"{t}.top_scores", pa.list_(pa.float32()))]
        if self.embeddings:
            fields.append(pa.field("embedding", pa.list_(pa.float32())))
        return pa.schema(fields)

    def table(self):
        import pyarrow as pa

        schema = self.schema()
        arrays = []
        for f in schema:
            v = self.cols[f.name]
            if f.name.endswith(".score"):
                v = np.concatenate(v) if v else np.zeros(0, np.float32)
            arrays.append(pa.array(v, type=f.type))
        return pa.Table.from_arrays(arrays, schema=schema)
