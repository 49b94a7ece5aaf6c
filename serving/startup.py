"""Checks a server must pass before any worker starts, shared by `clipheads serve` (exit 2 with one
line) and `bentoml serve` of the service (ClipHeads' `on_deployment` hook: exit 1 with one line),
so a wrong configuration stops the server instead of a worker that restarts forever or a front
that is never ready."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from .tasks import TaskStoreError, store_scheme


def tasks_store_problem(location: str) -> Optional[str]:
    """A one-line problem with a task-store location, or None. A database is not contacted: a
    replica may start before it (readiness waits for it)."""
    if not location:
        return None
    try:
        scheme = store_scheme(location)
    except TaskStoreError as err:
        return err.detail
    if scheme in ("", "file"):
        path = Path(location[len("file://"):] if scheme == "file" else location).expanduser()
        if path.exists() and not path.is_dir():
            return f"tasks store {path} exists and is not a directory"
    elif importlib.util.find_spec("psycopg") is None:
        return f"a {scheme}:// task store needs psycopg: pip install -r requirements/serve.txt"
    return None


def front_workers_problem(front_workers: int, tasks_store: str) -> Optional[str]:
    """Several fronts must share their few-shot tasks: each would hold its own in-memory store."""
    if front_workers > 1 and not tasks_store:
        return (f"{front_workers} front workers need a shared few-shot task store (--tasks-dir DIR or --tasks-store "
                "URL): with the in-memory store a task registered on one front would be unknown to the others")
    return None


def runtime_problem(source: Path, runtime: str) -> Optional[str]:
    """A runtime that can never open here (its package, engines or GPU provider missing), found
    before the encoder would fail at start-up again and again. Cheap: nothing is loaded."""
    if runtime == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "--runtime tensorrt needs the tensorrt package on this machine (or use --runtime auto / onnx)"
        if source.is_dir() and not any(source.glob("*.plan")):
            return (f"--runtime tensorrt needs TensorRT engines in {source}: run `clipheads export build-engine "
                    f"{source}` on this device first")
    if runtime == "onnx-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("--runtime onnx-cuda needs onnxruntime-gpu with a CUDA device (providers here: "
                    f"{', '.join(ort.get_available_providers())}); use --runtime auto or onnx-cpu")
    return None


def startup_problem(source: str, tasks_store: str, front_workers: int = 1, runtime: str = "auto") -> Optional[str]:
    """What stops a server with this configuration from ever serving, or None."""
    from .model_store import ModelStoreError, resolve_source

    if not source:
        return "set CLIPHEADS_SOURCE to a bundle directory, a *.head.safetensors file or a model tag"
    try:
        src = resolve_source(source)
    except ModelStoreError as err:
        return f"no such bundle or head: {err}"
    return (runtime_problem(Path(src), runtime) or tasks_store_problem(tasks_store)
            or front_workers_problem(front_workers, tasks_store))
