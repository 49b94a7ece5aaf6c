"""Training-free few-shot tasks registered at run time, and the stores that share them.

A task is a Tip-Adapter-style cache model (Zhang et al., 2022) built from a handful of labelled
example images, no gradient steps:

    keys    K = normalized features of the K example images          (K, E)
    values  V = one-hot labels of the examples                         (K, C)
    text    W = normalized zero-shot class embeddings of the labels    (C, E)
    logits(f) = s * f W^T  +  alpha * s/100 * exp(-beta (1 - f K^T)) V

(`s` is CLIP's logit scale; alpha=1, beta=5.5 are Tip-Adapter's training-free defaults.) Class
prototypes (normalized mean of each class's keys) are stored too and reported for inspection.

Where tasks live is chosen by one location string (`--tasks-store`, `select.open_task_store`):

    ""                          memory only (lost on restart)
    DIR or file://DIR           a directory: one machine (directory.py)
    postgresql://USER@HOST/DB   a PostgreSQL table shared by every replica (postgres.py)

Every store keeps tasks per backbone identity (a task's features only mean something for the
backbone that computed them), never unpickles anything (tensors are safetensors bytes, metadata
JSON) and answers `add` of an existing name with 409 unless `replace` is set, atomically: two
replicas registering one name at once get exactly one 201.
"""
from __future__ import annotations

import abc
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

log = logging.getLogger("clipheads.serving")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
STORE_VERSION = 1


class TaskStoreError(ValueError):
    def __init__(self, kind: str, detail: str, http_status: int = 422):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.http_status = kind, detail, http_status


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TaskStoreError(
            "invalid_task_name",
            "task names are 1-64 characters of letters, digits, '_' and '-', starting with a letter or digit",
            422,
        )
    return name


@dataclass
class FewShotTask:
    name: str
    labels: tuple[str, ...]
    keys: np.ndarray  # (K, E) normalized example features
    targets: np.ndarray  # (K,) int64 class index per example
    text: np.ndarray  # (C, E) normalized zero-shot class embeddings
    alpha: float = 1.0
    beta: float = 5.5
    created: float = 0.0

    @property
    def prototypes(self) -> np.ndarray:
        C = len(self.labels)
        protos = np.zeros((C, self.keys.shape[1]), np.float32)
        np.add.at(protos, self.targets, self.keys)
        return protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)

    def logits(self, feats: np.ndarray, logit_scale: float) -> np.ndarray:
        """(N, E) normalized image features -> (N, C)."""
        zs = logit_scale * feats @ self.text.T
        values = np.eye(len(self.labels), dtype=np.float32)[self.targets]  # (K, C)
        affinity = np.exp(-self.beta * (1.0 - feats @ self.keys.T))  # (N, K)
        return (zs + self.alpha * (logit_scale / 100.0) * affinity @ values).astype(np.float32)

    def summary(self) -> dict:
        counts = np.bincount(self.targets, minlength=len(self.labels))
        return {
            "name": self.name,
            "kind": "few_shot",
            "labels": list(self.labels),
            "shots": {l: int(c) for l, c in zip(self.labels, counts)},
            "created": self.created,
        }


class TaskStore(abc.ABC):
    """The registry of few-shot tasks one server sees. Reads come from a local copy (no I/O on a
    hit); writes are atomic in the backing store. Errors are TaskStoreError (a 4xx/503 answer)."""

    identity: str
    max_tasks: int
    may_block = True  # calls may wait on I/O: the front runs them off its event loop (front/store_calls.py)

    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def get(self, name: str) -> Optional[FewShotTask]: ...

    @abc.abstractmethod
    def add(self, name: str, labels: Sequence[str], keys: np.ndarray, targets: np.ndarray, text: np.ndarray,
            replace: bool = False) -> FewShotTask: ...

    @abc.abstractmethod
    def delete(self, name: str) -> bool: ...

    def list(self) -> list[dict]:
        out = []
        for n in self.names():
            task = self.get(n)
            if task is not None:
                out.append(task.summary())
        return out

    def describe(self) -> str:
        """Where the tasks live, safe to log (no credentials)."""
        return type(self).__name__

    def interrupt(self) -> None:
        """Unblock a call that has waited too long (the front gave up on it); a no-op where calls
        cannot hang."""

    def close(self) -> None:
        """Release connections and threads (a no-op for stores that hold none)."""


def new_task(name: str, labels: Sequence[str], keys: np.ndarray, targets: np.ndarray, text: np.ndarray) -> FewShotTask:
    return FewShotTask(
        name, tuple(labels), np.ascontiguousarray(keys, np.float32), np.asarray(targets, np.int64),
        np.ascontiguousarray(text, np.float32), created=round(time.time(), 3),
    )


def task_tensors(task: FewShotTask) -> bytes:
    """The task's arrays as safetensors bytes (the same layout in every store)."""
    from safetensors.numpy import save

    return save({"keys": task.keys, "targets": task.targets, "text": task.text})


def task_from_record(name: str, labels: Sequence[str], tensors: dict, alpha: float = 1.0, beta: float = 5.5,
                     created: float = 0.0) -> FewShotTask:
    """Rebuild and check a stored task (shapes, label range); ValueError when inconsistent."""
    task = FewShotTask(
        name, tuple(str(x) for x in labels), np.asarray(tensors["keys"], np.float32),
        np.asarray(tensors["targets"], np.int64), np.asarray(tensors["text"], np.float32),
        float(alpha), float(beta), float(created),
    )
    C, E = task.text.shape
    if C != len(task.labels) or task.keys.ndim != 2 or task.keys.shape[1] != E or len(task.targets) != len(task.keys):
        raise ValueError("tensor shapes do not match the labels")
    if task.targets.min(initial=0) < 0 or task.targets.max(initial=0) >= C:
        raise ValueError("example label out of range")
    return task


def redact(location: str) -> str:
    """`location` without a password, for logs and --dry-run."""
    if "://" not in location:
        return location
    parts = urlsplit(location)
    if parts.password is None:
        return location
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class LRUCache:
    """A small thread-safe LRU for text embeddings of request-time label sets."""

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._d: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: np.ndarray) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def get_or_compute(self, key: Hashable, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key]
            self.misses += 1
        value = compute()
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return value
