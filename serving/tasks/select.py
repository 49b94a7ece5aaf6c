"""`open_task_store(location, identity)`: the few-shot task store a location string names
(registry `STORE_SCHEMES`: a plain path or file://, postgresql://)."""
from __future__ import annotations

from typing import Callable
from urllib.parse import urlsplit

from .base import TaskStore, TaskStoreError
from .directory import DirectoryTaskStore
from .postgres import PostgresTaskStore


def _open_directory(location: str, identity: str, max_tasks: int) -> TaskStore:
    root = urlsplit(location).path if location.startswith("file://") else location
    return DirectoryTaskStore(root or None, identity, max_tasks)


def _open_postgres(location: str, identity: str, max_tasks: int) -> TaskStore:
    return PostgresTaskStore(location, identity, max_tasks)


# location scheme -> opener ("" = a plain path, or memory when the location is empty)
STORE_SCHEMES: dict[str, Callable[[str, str, int], TaskStore]] = {
    "": _open_directory,
    "file": _open_directory,
    "postgresql": _open_postgres,
    "postgres": _open_postgres,
}


def store_scheme(location: str) -> str:
    """The registry key of a location ("" for a plain path); TaskStoreError if unknown."""
    scheme = urlsplit(location).scheme.lower() if "://" in location else ""
    if scheme not in STORE_SCHEMES:
        raise TaskStoreError(
            "invalid_tasks_store",
            f"unknown task store {scheme + '://'!r}; use a directory or postgresql://USER@HOST:PORT/DB", 500,
        )
    return scheme


def open_task_store(location: str, identity: str, max_tasks: int = 256) -> TaskStore:
    """The store named by `location` (see the module docstring)."""
    return STORE_SCHEMES[store_scheme(location)](location, identity, max_tasks)
