"""`open_runtime(source, kind)`: the runtime for a bundle directory or a head file.

A bundle tries TensorRT (only if importable and engines are present), then ONNX Runtime CUDA, then
ONNX Runtime CPU; a head file (`*.head.safetensors`) runs in PyTorch: folded, fp16 with CUDA graphs
on a GPU (`torch_folded.py`), eagerly in fp32 otherwise. `kind` overrides ("onnx", "torch", ...).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .base import Runtime, RuntimeError_
from .onnx_runtime import OnnxRuntime
from .tensorrt_runtime import TensorRTRuntime, tensorrt_available
from .torch_eager import TorchRuntime
from .torch_folded import FoldedTorchRuntime

log = logging.getLogger("clipheads.serving")

RUNTIME_KINDS = ("auto", "tensorrt", "onnx", "onnx-cuda", "onnx-cpu", "torch", "torch-folded")


def register_extra_model_configs() -> None:
    """`CLIPHEADS_MODEL_CONFIGS=DIR[:DIR]`: extra open_clip architecture JSONs (custom/tiny models)."""
    extra = os.environ.get("CLIPHEADS_MODEL_CONFIGS")
    if not extra:
        return
    import open_clip

    for d in extra.split(os.pathsep):
        if d and Path(d).is_dir():
            open_clip.add_model_config(d)


def open_runtime(source: str | os.PathLike, kind: str = "auto", device: Optional[str] = None,
                 weights: Optional[str] = None, backbone=None) -> Runtime:
    """A Runtime for a bundle directory or a head file. Raises RuntimeError_ with a reason.
    `weights`: where a head file's backbone weights are now (sha256-checked against the head);
    a bundle's graphs hold the backbone already, so it is not used there. `device`: a head file's
    PyTorch device ("auto"/None: CUDA when available). `backbone`: an open `Backbone` to run a head
    file on (an in-memory head's own, whose weights may exist nowhere else): eager, on its device."""
    if kind not in RUNTIME_KINDS:
        raise RuntimeError_(f"unknown runtime {kind!r}; choose from {', '.join(RUNTIME_KINDS)}")
    src = Path(source)
    if not src.exists():
        raise RuntimeError_(f"no such bundle or head: {src}")
    if src.is_file():
        if kind not in ("auto", "torch", "torch-folded"):
            raise RuntimeError_(f"{src} is a head file; runtime {kind!r} needs an exported bundle directory")
        register_extra_model_configs()
        if weights is None:  # a head in the model store whose entry holds its backbone weights
            from ..model_entry import stored_weights

            weights = stored_weights(src)
        from clipheads.training.artifact import ArtifactError
        from clipheads.training.backbone import BackboneError
        from clipheads.training.fit import resolve_device

        try:  # "auto", a typo or "cuda" without a GPU: one line, not a weights-loading failure
            device = str(backbone.device) if backbone is not None else resolve_device(device)
        except BackboneError as err:
            raise RuntimeError_(str(err)) from None
        if backbone is not None and kind == "torch-folded":
            raise RuntimeError_("an in-memory head runs eagerly on its own backbone (runtime 'torch'); "
                                "save it (clipheads.save_head) and open the file to run it folded")
        try:  # a head whose backbone cannot be opened (moved weights, sha or activation mismatch): a reason
            if backbone is not None:
                return TorchRuntime(src, device=device, backbone=backbone)
            if kind == "torch-folded" or (kind == "auto" and device.startswith("cuda")):
                try:  # fp16 + CUDA graphs on a GPU (bench/gpu); refuses heads that do not fold (CoCoOp)
                    return FoldedTorchRuntime(src, device=device, weights=weights)
                except RuntimeError_ as err:
                    if kind == "torch-folded":
                        raise
                    log.warning("folded runtime not used (%s); running the head eagerly", err)
            return TorchRuntime(src, device=device, weights=weights)
        except (ArtifactError, BackboneError) as err:
            raise RuntimeError_(f"{src}: {err}") from err
    if weights:
        log.info("%s is a bundle: its graphs hold the backbone, backbone weights %s not used", src, weights)
    if kind in ("torch", "torch-folded"):
        raise RuntimeError_(f"{src} is a bundle; the {kind} runtime runs a head file (*.head.safetensors)")
    if kind == "tensorrt":
        if not tensorrt_available(src):
            raise RuntimeError_(f"{src}: --runtime tensorrt needs the `tensorrt` package and engines in the bundle "
                                "(`clipheads export build-engine BUNDLE` on this device)")
        return TensorRTRuntime(src)
    if kind == "auto" and tensorrt_available(src):
        try:
            return TensorRTRuntime(src)
        except RuntimeError_ as err:  # incompatible/missing engines: the next runtime in line
            log.warning("TensorRT not used (%s); falling back to ONNX Runtime", err)
    import onnxruntime as ort

    providers = None
    if kind == "onnx-cpu":
        providers = ["CPUExecutionProvider"]
    elif kind == "onnx-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError_("onnx-cuda requested but onnxruntime has no CUDAExecutionProvider here")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return OnnxRuntime(src, providers=providers)
