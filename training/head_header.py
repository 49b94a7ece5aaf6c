"""What a head file says about itself, read without torch: its safetensors header and metadata.

`clipheads serve`, `models save` and `info`-like checks need the method, tasks and backbone record
of a head, not its tensors. Reading only the header keeps those commands free of the torch and
open_clip imports (seconds per process) and validates everything but the tensor bytes, which
`artifact.load_head` adds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FORMAT_VERSION = 1
METADATA_KEY = "clipheads"
SUFFIX = ".head.safetensors"
STORED_DTYPE = "F32"  # heads store fp32 (safetensors' dtype name)


class ArtifactError(ValueError):
    """The file is not a valid clipheads head (or does not fit the backbone it is used with)."""


@dataclass(frozen=True)
class HeadHeader:
    """A head's metadata (as JSON) and its tensors' shapes, all checked for shape and kind."""

    path: Path
    meta: dict
    tensor_shapes: dict[str, tuple[int, ...]]

    @property
    def method(self) -> str:
        return self.meta["method"]["name"]

    @property
    def method_config(self) -> dict:
        return dict(self.meta["method"].get("config") or {})

    @property
    def backbone(self) -> dict:
        return dict(self.meta["backbone"])

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.meta["tasks"]]


def _check_task(task: Any) -> None:
    if not isinstance(task, Mapping) or not isinstance(task.get("name"), str):
        raise TypeError(f"a task is {task!r}, not an object with a name")
    classes = task.get("classnames")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise TypeError(f"task {task['name']!r}: classnames must be a non-empty list of strings")


def _check_meta(meta: Any) -> None:
    """The keys load_head reads, with the types it needs (KeyError/TypeError otherwise)."""
    if not isinstance(meta, Mapping):
        raise TypeError("metadata is not a JSON object")
    if not isinstance(meta["method"]["name"], str):
        raise TypeError("method.name is not a string")
    if not isinstance(meta["method"].get("config") or {}, Mapping):
        raise TypeError("method.config is not an object")
    if not isinstance(meta["backbone"], Mapping) or not isinstance(meta["preprocess"], Mapping):
        raise TypeError("backbone and preprocess must be objects")
    if not isinstance(meta["tasks"], list):
        raise TypeError("tasks is not a list")
    for task in meta["tasks"]:
        _check_task(task)


def read_head_header(path: str | Path) -> HeadHeader:
    """Read and validate a head file's header. Never unpickles; raises ArtifactError with a reason."""
    from .files import NotSafetensors, read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no such head file: {path}")
    try:
        header = read_safetensors_header(path, strict=True)
    except NotSafetensors as err:
        raise ArtifactError(str(err)) from None
    meta_raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if meta_raw is None:
        raise ArtifactError(f"{path}: a safetensors file but not a clipheads head (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: metadata is not valid JSON: {err}") from None
    version = meta.get("format_version") if isinstance(meta, Mapping) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: head format_version {version!r} is not supported (this clipheads reads {FORMAT_VERSION}); "
            "upgrade clipheads or re-export the head"
        )
    try:
        _check_meta(meta)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: incomplete head metadata ({type(err).__name__}: {err})") from None
    if not meta["tasks"]:
        raise ArtifactError(f"{path}: head lists no tasks")
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name], dtype = tuple(int(n) for n in info["shape"]), info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: corrupt tensor entry {name!r} in the header") from None
        if dtype != STORED_DTYPE:
            raise ArtifactError(f"{path}: tensor {name!r} is {dtype}; heads store fp32")
    return HeadHeader(path=path, meta=meta, tensor_shapes=shapes)
