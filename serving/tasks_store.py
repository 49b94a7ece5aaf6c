"""Training-free few-shot tasks registered at run time, persisted so any replica can rebuild them.

A task is a Tip-Adapter-style cache model (Zhang et al., 2022) built from a handful of labelled
example images, no gradient steps:

    keys    K = normalized features of the K example images          (K, E)
    values  V = one-hot labels of the examples                         (K, C)
    text    W = normalized zero-shot class embeddings of the labels    (C, E)
    logits(f) = s * f W^T  +  alpha * s/100 * exp(-beta (1 - f K^T)) V

(`s` is CLIP's logit scale; alpha=1, beta=5.5 are Tip-Adapter's training-free defaults.) Class
prototypes (normalized mean of each class's keys) are stored too and reported for inspection.

On disk: `DIR/NAME.safetensors` (tensors) then `DIR/NAME.json` (metadata, written last: its
presence commits the task). Names match `NAME_RE`; files are only ever addressed as
`DIR / (validated name + suffix)`, so no request can reach outside DIR. Tasks recorded under a
different backbone identity are skipped at load with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

log = logging.getLogger("clipheads.serving")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
STORE_VERSION = 1


class TaskStoreError(ValueError):
    def __init__(self, kind: str, detail: str, http_status: int = 422):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.http_status = kind, detail, http_status


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
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


class TaskStore:
    """Thread-safe registry of few-shot tasks backed by a directory (or memory if None)."""

    def __init__(self, root: Optional[str | os.PathLike], identity: str, max_tasks: int = 256):
        self.root = Path(root) if root else None
        self.identity = identity
        self.max_tasks = max_tasks
        self._tasks: dict[str, FewShotTask] = {}
        self._lock = threading.RLock()
        self._seen_mtime: Optional[float] = None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.reload()

    # ---- persistence -----------------------------------------------------------------------
    def _files(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        assert self.root is not None
        return self.root / f"{name}.json", self.root / f"{name}.safetensors"

    def _load_one(self, meta_path: Path) -> Optional[FewShotTask]:
        from safetensors.numpy import load_file

        name = meta_path.name[: -len(".json")]
        if not NAME_RE.match(name) or meta_path.is_symlink():
            log.warning("task store: ignoring %s (bad name or symlink)", meta_path.name)
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("store_version") != STORE_VERSION or meta.get("name") != name:
                raise ValueError("unknown store_version or name mismatch")
            if meta.get("identity") != self.identity:
                log.warning("task store: skipping %s: registered on backbone %s, serving %s", name, meta.get("identity"), self.identity)
                return None
            tpath = self.root / f"{name}.safetensors"
            if tpath.is_symlink():
                raise ValueError("tensor file is a symlink")
            t = load_file(str(tpath))
            labels = tuple(str(x) for x in meta["labels"])
            task = FewShotTask(
                name, labels, t["keys"].astype(np.float32), t["targets"].astype(np.int64), t["text"].astype(np.float32),
                float(meta.get("alpha", 1.0)), float(meta.get("beta", 5.5)), float(meta.get("created", 0.0)),
            )
            C, E = task.text.shape
            if C != len(labels) or task.keys.ndim != 2 or task.keys.shape[1] != E or len(task.targets) != len(task.keys):
                raise ValueError("tensor shapes do not match the labels")
            if task.targets.min(initial=0) < 0 or task.targets.max(initial=0) >= C:
                raise ValueError("example label out of range")
            return task
        except Exception as err:  # noqa: BLE001 - a bad file must not stop the service
            log.warning("task store: ignoring %s: %s", name, err)
            return None

    def _dir_mtime(self) -> Optional[float]:
        try:
            return self.root.stat().st_mtime if self.root else None
        except OSError:
            return None

    def reload(self) -> None:
        """Rescan the directory (another replica may have added or removed tasks)."""
        if self.root is None:
            return
        with self._lock:
            mtime = self._dir_mtime()
            tasks = {}
            for p in sorted(self.root.glob("*.json")):
                task = self._load_one(p)
                if task is not None:
                    tasks[task.name] = task
            self._tasks = tasks
            self._seen_mtime = mtime

    def refresh_if_changed(self) -> None:
        if self.root is not None and self._dir_mtime() != self._seen_mtime:
            self.reload()

    def _save(self, task: FewShotTask) -> None:
        if self.root is None:
            return
        from safetensors.numpy import save_file

        meta_path, tpath = self._files(task.name)
        tmp_t = tpath.with_name(tpath.name + ".tmp")
        tmp_m = meta_path.with_name(meta_path.name + ".tmp")
        save_file({"keys": task.keys, "targets": task.targets, "text": task.text}, str(tmp_t))
        os.replace(tmp_t, tpath)
        meta = {
            "store_version": STORE_VERSION, "name": task.name, "labels": list(task.labels),
            "identity": self.identity, "alpha": task.alpha, "beta": task.beta, "created": task.created,
            "method": "tip-adapter (training-free)",
        }
        tmp_m.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_m, meta_path)  # commit point

    # ---- API -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.refresh_if_changed()
        with self._lock:
            return sorted(self._tasks)

    def get(self, name: str) -> Optional[FewShotTask]:
        self.refresh_if_changed()
        with self._lock:
            return self._tasks.get(name)

    def list(self) -> list[dict]:
        self.refresh_if_changed()
        with self._lock:
            return [self._tasks[n].summary() for n in sorted(self._tasks)]

    def add(self, name: str, labels: Sequence[str], keys: np.ndarray, targets: np.ndarray, text: np.ndarray,
            replace: bool = False) -> FewShotTask:
        check_name(name)
        with self._lock:
            self.refresh_if_changed()
            if name in self._tasks and not replace:
                raise TaskStoreError("task_exists", f"task {name!r} already exists; delete it first", 409)
            if name not in self._tasks and len(self._tasks) >= self.max_tasks:
                raise TaskStoreError("too_many_tasks", f"the registry holds at most {self.max_tasks} tasks", 409)
            task = FewShotTask(
                name, tuple(labels), np.ascontiguousarray(keys, np.float32), np.asarray(targets, np.int64),
                np.ascontiguousarray(text, np.float32), created=round(time.time(), 3),
            )
            self._save(task)
            self._tasks[name] = task
            self._seen_mtime = self._dir_mtime()
            return task

    def delete(self, name: str) -> bool:
        check_name(name)
        with self._lock:
            self.refresh_if_changed()
            found = self._tasks.pop(name, None) is not None
            if self.root is not None:
                meta_path, tpath = self._files(name)
                for p in (meta_path, tpath):  # metadata first: a half-deleted task is simply absent
                    try:
                        p.unlink()
                        found = True
                    except FileNotFoundError:
                        pass
                self._seen_mtime = self._dir_mtime()
            return found


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
