"""The directory task store (one machine; memory only without a directory).

Tasks are kept per backbone identity, each in its own folder, so servers on different backbones
can share one directory without seeing, blocking or deleting each other's tasks:

    DIR/backbone-<sha256(identity)[:16]>/identity.txt            the identity, for people
    DIR/backbone-<...>/NAME.<token>.safetensors                  tensors, a fresh name per registration
    DIR/backbone-<...>/NAME.json                                 metadata naming that tensor file

The metadata file is the commit point: it is linked into place with `os.link`, which fails if the
name exists, so two processes registering one name at once get exactly one success and neither
overwrites the other's tensors (`replace` renames over it instead). Files are only ever addressed
as `folder / (validated name + suffix)`, so no request reaches outside DIR. Tasks an earlier
version kept directly in DIR move into their identity's folder when a server of that identity
opens the store. Files are written with the process umask (0644/0755 by default), like every file
clipheads writes.
"""
from __future__ import annotations

import hashlib
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


def identity_folder(identity: str) -> str:
    """The folder name of one backbone identity's tasks (identities hold ':' and '/')."""
    return "backbone-" + hashlib.sha256(identity.encode()).hexdigest()[:16]


class DirectoryTaskStore(TaskStore):
    """Thread-safe registry backed by a directory (or memory if `root` is None)."""

    def __init__(self, root: Optional[str | os.PathLike], identity: str, max_tasks: int = 256):
        self.root = Path(root) if root else None
        self.identity = identity
        self.max_tasks = max_tasks
        self._tasks: dict[str, FewShotTask] = {}
        self._lock = threading.RLock()
        self._seen_mtime: Optional[float] = None
        self.dir: Optional[Path] = None  # this identity's folder under root
        if self.root is not None:
            if self.root.exists() and not self.root.is_dir():
                raise TaskStoreError("invalid_tasks_store", f"{self.root} is not a directory", 500)
            self.dir = self.root / identity_folder(identity)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                label = self.dir / "identity.txt"
                if not label.is_file():
                    label.write_text(identity + "\n")
            except OSError as err:
                raise TaskStoreError("invalid_tasks_store", f"cannot write the task store {self.root}: {err}", 500) from None
            self._adopt_legacy_tasks()
            self.reload()

    @property
    def may_block(self) -> bool:  # memory only: dictionary lookups
        return self.root is not None

    def describe(self) -> str:
        return f"directory {self.dir}" if self.dir else "memory"

    # ---- persistence -----------------------------------------------------------------------
    def _meta_path(self, name: str) -> Path:
        check_name(name)
        assert self.dir is not None
        return self.dir / f"{name}.json"

    def _tensor_path(self, name: str, meta: dict) -> Path:
        fname = str(meta.get("tensors", f"{name}.safetensors"))
        m = _TENSORS_RE.fullmatch(fname)
        if not m or m.group("name") != name:
            raise ValueError(f"bad tensor file name {fname[:80]!r}")
        return self.dir / fname

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

    def _adopt_legacy_tasks(self) -> None:
        """Move this identity's tasks from DIR itself (the layout before identity folders) into its
        folder; a name the folder already holds stays where it is (and is reported)."""
        for meta_path in sorted(self.root.glob("*.json")):
            name = meta_path.name[: -len(".json")]
            try:
                if not NAME_RE.fullmatch(name) or meta_path.is_symlink():
                    continue
                meta = json.loads(meta_path.read_text())
                if meta.get("identity") != self.identity or meta.get("name") != name:
                    continue
                fname = str(meta.get("tensors", f"{name}.safetensors"))
                m = _TENSORS_RE.fullmatch(fname)
                if not m or m.group("name") != name:
                    continue
                os.replace(self.root / fname, self.dir / fname)
                try:
                    os.link(meta_path, self._meta_path(name))
                except FileExistsError:
                    os.replace(self.dir / fname, self.root / fname)
                    log.warning("task store: %s stays in %s: %s already holds a task of that name",
                                meta_path.name, self.root, self.dir.name)
                    continue
                meta_path.unlink()
                log.info("task store: moved task %r into %s", name, self.dir)
            except (OSError, ValueError) as err:  # another process moved it first, or a bad file
                log.warning("task store: not moving %s: %s", meta_path.name, err)

    def _dir_mtime(self) -> Optional[float]:
        try:
            return self.dir.stat().st_mtime if self.dir else None
        except OSError:
            return None

    def reload(self) -> None:
        """Rescan the directory (another process may have added or removed tasks)."""
        if self.root is None:
            return
        with self._lock:
            mtime = self._dir_mtime()
            tasks = {}
            for p in sorted(self.dir.glob("*.json")):
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
        tpath = self.dir / tname
        tmp_t = self.dir / f".{tname}.tmp"
        tmp_m = self.dir / f".{task.name}.{secrets.token_hex(8)}.json.tmp"
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
                    tpath = self.dir / f"{name}.safetensors"
                for p in (meta_path, tpath):  # metadata first: a half-deleted task is simply absent
                    try:
                        p.unlink()
                        found = True
                    except FileNotFoundError:
                        pass
                self._seen_mtime = self._dir_mtime()
            return found
