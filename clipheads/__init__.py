"""clipheads: train tiny heads for CLIP, fold them into ONNX/TensorRT graphs, serve them.

This top-level package only holds the `clipheads` entry point; the work lives in the
`training`, `export` and `serving` packages (data flows one way between them).
"""
from training import __version__

__all__ = ["__version__"]
