"""Runtime outputs -> output columns: one pass per distinct image path, then top-k per task.

Every part has the same top-level columns whatever the tasks (no dots in any name):

    index        int64
    path         string
    predictions  struct<{task}: struct<label string, score float32
                                       [, top_labels fixed_size_list<string, k>,
                                          top_scores fixed_size_list<float32, k>]>>
    embedding    fixed_size_list<float32, E>   (only with --embeddings)

k = min(top_k, the task's classes). DuckDB: `SELECT path, predictions.pets.label FROM
'OUT.parquet/*.parquet'`; pandas: `pd.read_parquet(OUT)` then `df.predictions.str["pets"]`;
pyarrow: `table.flatten()`. The `clipheads` key of each part's key-value metadata says what the
columns mean and where the numbers came from (shards.py `part_metadata`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

COLUMN_DOCS = {
    "index": "position of the input in the listing",
    "path": "relative to the input directory, or as written in the CSV/Parquet listing",
    "predictions.<task>.label": "top-1 label",
    "predictions.<task>.score": "top-1 softmax probability (what POST /classify returns)",
    "predictions.<task>.top_labels": "top-k labels, best first (only when top_k > 1)",
    "predictions.<task>.top_scores": "their softmax probabilities",
    "embedding": "L2-normalized image features of the base image path (only with --embeddings)",
}


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


def embedding_dim(runtime, info: dict) -> int:
    """E of the `embedding` column: the source's record, else one probe pass (older heads)."""
    dim = info.get("embed_dim")
    if dim:
        return int(dim)
    s = int(runtime.preprocess["image_size"])
    return int(runtime.encode_images(np.full((1, 3, s, s), 127, np.uint8)).shape[1])


class Columns:
    """Accumulates one shard's output columns (top-k of each task) batch by batch."""

    def __init__(self, tasks: dict[str, list[str]], top_k: int, embeddings: bool, embed_dim: int = 0):
        self.tasks = tasks
        self.top_k = top_k
        self.embeddings = embeddings
        if embeddings and embed_dim < 1:
            raise ValueError("embeddings need the embedding dimension")
        self.embed_dim = int(embed_dim)
        self.k = {t: min(top_k, len(labels)) for t, labels in tasks.items()}
        self.reset()

    def reset(self) -> None:
        self.index: list[int] = []
        self.path: list[str] = []
        self.labels: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}  # (N, k) object
        self.scores: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}  # (N, k) float32
        self.feats: list[np.ndarray] = []

    def add(self, indices: Sequence[int], keys: Sequence[str], logits: dict[str, np.ndarray], feats) -> None:
        self.index.extend(indices)
        self.path.extend(keys)
        for t, labels in self.tasks.items():
            probs = softmax(logits[t])
            order = np.argsort(-probs, axis=1, kind="stable")[:, :self.k[t]]  # (N, k)
            self.scores[t].append(np.take_along_axis(probs, order, axis=1))
            self.labels[t].append(np.asarray(labels, dtype=object)[order])
        if self.embeddings:
            self.feats.append(np.asarray(feats, np.float32))

    def _task_type(self, t: str):
        import pyarrow as pa

        fields = [pa.field("label", pa.string()), pa.field("score", pa.float32())]
        if self.top_k > 1:
            fields += [pa.field("top_labels", pa.list_(pa.string(), self.k[t])),
                       pa.field("top_scores", pa.list_(pa.float32(), self.k[t]))]
        return pa.struct(fields)

    def schema(self):
        import pyarrow as pa

        fields = [pa.field("index", pa.int64()), pa.field("path", pa.string()),
                  pa.field("predictions", pa.struct([pa.field(t, self._task_type(t)) for t in self.tasks]))]
        if self.embeddings:
            fields.append(pa.field("embedding", pa.list_(pa.float32(), self.embed_dim)))
        return pa.schema(fields)

    def _task_array(self, t: str):
        import pyarrow as pa

        k = self.k[t]
        labels = np.concatenate(self.labels[t]) if self.labels[t] else np.zeros((0, k), object)
        scores = np.concatenate(self.scores[t]) if self.scores[t] else np.zeros((0, k), np.float32)
        children = [pa.array(labels[:, 0].tolist(), pa.string()), pa.array(scores[:, 0], pa.float32())]
        if self.top_k > 1:
            children += [pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1).tolist(), pa.string()), k),
                         pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1), pa.float32()), k)]
        return pa.StructArray.from_arrays(children, fields=list(self._task_type(t)))

    def table(self):
        import pyarrow as pa

        schema = self.schema()
        preds = pa.StructArray.from_arrays([self._task_array(t) for t in self.tasks],
                                           fields=list(schema.field("predictions").type))
        arrays = [pa.array(self.index, pa.int64()), pa.array(self.path, pa.string()), preds]
        if self.embeddings:
            feats = np.concatenate(self.feats) if self.feats else np.zeros((0, self.embed_dim), np.float32)
            if feats.shape[1:] != (self.embed_dim,):
                raise ValueError(f"features of shape {feats.shape[1:]}, expected ({self.embed_dim},)")
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), self.embed_dim))
        return pa.Table.from_arrays(arrays, schema=schema)
