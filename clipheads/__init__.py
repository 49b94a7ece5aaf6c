"""clipheads: train tiny heads for CLIP, fold them into ONNX/TensorRT graphs, serve them.

The Python API is the same code the `clipheads` command runs:

    >>> import clipheads
    >>> head = clipheads.train("coop", "photos/", test_fraction=0.2)        # doctest: +SKIP
    >>> clipheads.save_head(head, "photos.head.safetensors")               # doctest: +SKIP
    >>> clipheads.evaluate(head, "more-photos/")                           # doctest: +SKIP
    >>> clipheads.export_bundle(head, "bundle/").passed                    # doctest: +SKIP
    >>> with clipheads.Predictor("bundle/") as p:                          # doctest: +SKIP
    ...     p.predict("cat.jpg", top_k=3)

| name | what | the part it lives in |
|---|---|---|
| `load_backbone(arch, pretrained, device)` | a frozen open_clip model with hookable towers | `clipheads.training.backbone` |
| `list_methods()`, `list_recipes()` | registered methods, packaged recipes | `clipheads.training` |
| `train(method, data, ...)` | train a head with its method's recipe defaults -> `HeadMethod` | `clipheads.training.fit` |
| `save_head(head, path)`, `load_head(path)` | head files (`NAME.head.safetensors`) | `clipheads.training` |
| `read_head(path)` | a head file's metadata and tensors, unbuilt (`HeadArtifact`) | `clipheads.training.artifact` |
| `evaluate(head, data, split)` | top-1 per task, refusing to score training images | `clipheads.training.fit` |
| `prepare_pixels(image, spec)` | the one preprocessing path (EXIF, RGB, resize, crop) | `clipheads.training.preprocess` |
| `export_bundle(heads, out, ...)` | a parity-gated ONNX/TensorRT bundle (`clipheads export`) | `clipheads.export` |
| `Predictor(source)` | `predict`, `zero_shot`, `embed` with the server's runtime and preprocessing | `clipheads.predictor` |

One installed namespace: `clipheads.training`, `clipheads.export`, `clipheads.serving`; data flows
one way between them (`clipheads.export` is that sub-package, hence `export_bundle` for the
function). This module stays import-light (no torch until an attribute is used): the
names above resolve lazily through module `__getattr__`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute", imported on first use
_LAZY = {
    "load_backbone": "clipheads.training.backbone:load_backbone",
    "list_methods": "clipheads.training.methods:list_methods",
    "list_recipes": "clipheads.training.protocols.recipes:list_recipes",
    "train": "clipheads.training.fit:train",
    "evaluate": "clipheads.training.fit:evaluate",
    "load_head": "clipheads.training.fit:open_head",
    "save_head": "clipheads.training.artifact:save_head",
    "read_head": "clipheads.training.artifact:load_head",
    "prepare_pixels": "clipheads.training.preprocess:prepare_pixels",
    "PreprocessSpec": "clipheads.training.preprocess:PreprocessSpec",
    "TrainConfig": "clipheads.training.loop:TrainConfig",
    "export_bundle": "clipheads.api:export_bundle",
    "Predictor": "clipheads.predictor:Predictor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'clipheads' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
