"""TensorRT engines for a bundle's image graphs (the text graph stays on ONNX Runtime)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import RuntimeError_
from .onnx_runtime import OnnxRuntime


def tensorrt_available(bundle: Path) -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return any(bundle.glob("*.plan"))


class TensorRTRuntime(OnnxRuntime):
    """Image graphs through the bundle's TensorRT engines (built on this device by `clipheads export
    build-engine`); the text graph stays on ONNX Runtime. Every engine must be compatible with this
    GPU and TensorRT version (`export.tensorrt.select_engines`), else it refuses with the reasons.
    UNVERIFIED ON HARDWARE: written against the TensorRT 10/11 Python API, not yet run on a GPU."""

    def __init__(self, bundle: str | os.PathLike, verify: bool = True):
        super().__init__(bundle, providers=["CPUExecutionProvider"], verify=verify, image_sessions=False)
        from clipheads.export.tensorrt import Engine, TensorRTUnavailable, current_device, select_engines

        root = Path(bundle)
        graphs = sorted({g for g, _ in self._path_keys})
        try:
            here = current_device()
        except TensorRTUnavailable as err:
            raise RuntimeError_(str(err)) from None
        usable, refused = select_engines(self.manifest, graphs, here)
        if refused:
            raise RuntimeError_("TensorRT engines not usable here: " + "; ".join(f"{g}: {why}" for g, why in refused.items()))
        prof = (self.manifest.get("tensorrt") or {}).get("profile") or {}
        max_batch = int(prof.get("max") or self.manifest.get("max_batch", 64))
        try:  # a tag can match and the engine still not load (no preflight API): a reason, then fallback
            self._engines = {g: Engine(root / f, max_batch) for g, f in usable.items()}
        except Exception as err:  # noqa: BLE001 - TensorRT/CUDA raise their own types
            raise RuntimeError_(f"TensorRT engines in {root} did not load here: {type(err).__name__}: {err}") from err
        self.name = "tensorrt"

    def run_path(self, path: int, pixels: np.ndarray, alongside: bool = False) -> tuple[np.ndarray, np.ndarray]:
        fname, k = self._path_keys[path]
        feed = {"pixels": self._feed_pixels(pixels)}
        if "task_index" in self._engines[fname].inputs:
            feed["task_index"] = np.full((len(pixels),), k, np.int64)
        with self._lock:  # one execution context per engine
            out = self._engines[fname](feed, ["logits", "features"])
        return out["logits"], out["features"]


