"""The directory task store (one machine; memory only without a directory).

On disk, per task: `DIR/NAME.<token>.safetensors` (tensors, a fresh name per registration) and
`DIR/NAME.json` (metadata naming that tensor file). The metadata file is the commit point: it is
linked into place with `os.link`, which fails if the name exists, so two processes registering
one name at once get exactly one success and neither overwrites the other's tensors (`replace`
renames over it instead). Files are only ever addressed as `DIR / (validated name + suffix)`, so no
request reaches outside DIR. Tasks recorded under another backbone identity are skipped at load.
Files are written with the process umask (0644/0755 by default), like every file clipheads writes.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .base import (
    NAME_RE, STORE_VERSION, FewShotTask, TaskStore, TaskStoreError, check_name, log, new_task, task_from_record,
    task_tensors,
)

_TENSORS_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})(\.[0-9a-f]{16})?\.safetensors\Z")


class DirectoryTaskStore(TaskStore):
    """Thread-safe registry backed by a directory (or memory if `root` is None)."""

    def __init__(self, root: Optional[str | os.PathLike], identity: str, max_tasks: int = 256):
        self.root = Path(root) if root else None
        self.identity = identity
        self.max_tasks = max_tasks
        self._tasks: dict[str, FewShotTask] = {}
        self._lock = threading.RLock()
        self._seen_mtime: Optional[float] = None
        if self.root is not None:
            if self.root.exists() and not self.root.is_dir():
                raise TaskStoreError("invalid_tasks_store", f"{self.root} is not a directory", 500)
            self.root.mkdir(parents=True, exist_ok=True)
            self.reload()

    def describe(self) -> str:
        return f"directory {self.root}" if self.root else "memory"

    # ---- persistence -----------------------------------------------------------------------
    def _meta_path(self, name: str) -> Path:
        check_name(name)
        assert self.root is not None
        return self.root / f"{name}.json"

    def _tensor_path(self, name: str, meta: dict) -> Path:
        fname = str(meta.get("tensors", f"{name}.safetensors"))
        m = _TENSORS_RE.fullmatch(fname)
        if not m or m.group("name") != name:
            raise ValueError(f"bad tensor file name {fname[:80]!r}")
        return self.root / fname

    def _load_one(self, meta_path: Path) -> Optional[FewShotTask]:
        from safetensors.numpy import load_file

        name = meta_path.name[: -len(".json")]
        if not NAME_RE.fullmatch(name) or meta_path.is_symlink():
            log.warning("task store: ignoring %s (bad name or symlink)", meta_path.name)
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("store_version") != STORE_VERSION or meta.get("name") != name:
                raise ValueError("unknown store_version or name mismatch")
            if meta.get("identity") != self.identity:
                log.warning("task store: skipping %s: registered on backbone %s, serving %s",
                            name, meta.get("identity"), self.identity)
                return None
            tpath = self._tensor_path(name, meta)
            if tpath.is_symlink():
                raise ValueError("tensor file is a symlink")
            return task_from_record(name, meta["labels"], load_file(str(tpath)), meta.get("alpha", 1.0),
                                    meta.get("beta", 5.5), meta.get("created", 0.0))
        except Exception as err:  # noqa: BLE001 - a bad file must not stop the service
            log.warning("task store: ignoring %s: %s", name, err)
            return None

    def _dir_mtime(self) -> Optional[float]:
        try:
            return self.root.stat().st_mtime if self.root else None
        except OSError:
            return None

    def reload(self) -> None:
        """Rescan the directory (another process may have added or removed tasks)."""
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

    def _save(self, task: FewShotTask, replace: bool) -> None:
        if self.root is None:
            return
        meta_path = self._meta_path(task.name)
        tname = f"{task.name}.{secrets.token_hex(8)}.safetensors"
        tpath = self.root / tname
        tmp_t = self.root / f".{tname}.tmp"
        tmp_m = self.root / f".{task.name}.{secrets.token_hex(8)}.json.tmp"
        old_tensors: Optional[Path] = None
        try:
            tmp_t.write_bytes(task_tensors(task))
            os.replace(tmp_t, tpath)
            meta = {
                "store_version": STORE_VERSION, "name": task.name, "labels": list(task.labels),
                "identity": self.identity, "alpha": task.alpha, "beta": task.beta, "created": task.created,
                "method": "tip-adapter (training-free)", "tensors": tname,
            }
            tmp_m.write_text(json.dumps(meta, indent=1))
            if replace:
                try:
                    old_tensors = self._tensor_path(task.name, json.loads(meta_path.read_text()))
                except (OSError, ValueError):
                    old_tensors = None
                os.replace(tmp_m, meta_path)  # commit point
            else:
                try:
                    os.link(tmp_m, meta_path)  # commit point; fails if another process committed first
                except FileExistsError:
                    tpath.unlink(missing_ok=True)
                    raise TaskStoreError("task_exists", f"task {task.name!r} already exists; delete it first", 409) from None
        finally:
            tmp_t.unlink(missing_ok=True)
            tmp_m.unlink(missing_ok=True)
        if old_tensors is not None and old_tensors != tpath:
            old_tensors.unlink(missing_ok=True)

    # ---- API -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.refresh_if_changed()
        with self._lock:
            return sorted(self._tasks)

    def get(self, name: str) -> Optional[FewShotTask]:
        self.refresh_if_changed()
        with self._lock:
            return self._tasks.get(name)

    def add(self, name: str, labels: Sequence[str], keys: np.ndarray, targets: np.ndarray, text: np.ndarray,
            replace: bool = False) -> FewShotTask:
        check_name(name)
        with self._lock:
            self.refresh_if_changed()
            if name in self._tasks and not replace:
                raise TaskStoreError("task_exists", f"task {name!r} already exists; delete it first", 409)
            if name not in self._tasks and len(self._tasks) >= self.max_tasks:
                raise TaskStoreError("too_many_tasks", f"the registry holds at most {self.max_tasks} tasks", 409)
            task = new_task(name, labels, keys, targets, text)
            self._save(task, replace=replace)
            self._tasks[name] = task
            self._seen_mtime = self._dir_mtime()
            return task

    def delete(self, name: str) -> bool:
        check_name(name)
        with self._lock:
            self.refresh_if_changed()
            found = self._tasks.pop(name, None) is not None
            if self.root is not None:
                meta_path = self._meta_path(name)
                try:
                    tpath = self._tensor_path(name, json.loads(meta_path.read_text()))
                except (OSError, ValueError):
                    tpath = self.root / f"{name}.safetensors"
                for p in (meta_path, tpath):  # metadata first: a half-deleted task is simply absent
                    try:
                        p.unlink()
                        found = True
                    except FileNotFoundError:
                        pass
                self._seen_mtime = self._dir_mtime()
            return found
