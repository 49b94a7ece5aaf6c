"""clipheads: train tiny heads for CLIP, fold them into ONNX/TensorRT graphs, serve them.

One installed namespace: `clipheads.training` (backbones, methods, data, the loop, head
artifacts), `clipheads.export` (fold, ONNX/TensorRT, parity gate, bundles) and
`clipheads.serving` (runtimes, HTTP service, batch scoring); data flows one way between them.
This module stays import-light (no torch): the entry point and `--version` load fast.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
