"""Runtimes: one interface (`base.Runtime`) over ONNX Runtime, TensorRT and PyTorch (eager or folded).

    base.py              the interface, TaskInfo, softmax, ranked
    bundle.py            manifest reading, task layout, fingerprints (nothing runs)
    onnx_runtime.py      OnnxRuntime: bundle graphs on ORT (CPU / CUDA)
    split_pass.py        a CPU batch as two 1-thread half passes at once (OnnxRuntime on 2 threads)
    tensorrt_runtime.py  TensorRTRuntime: bundle engines (text graph on ORT)
    torch_eager.py       TorchRuntime: a head file, eagerly (the reference)
    torch_folded.py      FoldedTorchRuntime: a head file folded as export would (fp16 + CUDA graphs)
    select.py            open_runtime(source, kind): picks one of the above

Imports run one way: select -> implementations -> bundle -> base.
"""
from .base import Runtime, RuntimeError_, TaskInfo, ranked, softmax
from .bundle import backbone_identity, index_tasks, read_manifest, source_sha256
from .onnx_runtime import OnnxRuntime
from .select import RUNTIME_KINDS, open_runtime, register_extra_model_configs
from .tensorrt_runtime import TensorRTRuntime, tensorrt_available
from .torch_eager import TorchRuntime
from .torch_folded import FoldedTorchRuntime

__all__ = [
    "Runtime", "RuntimeError_", "TaskInfo", "ranked", "softmax", "backbone_identity", "index_tasks", "read_manifest",
    "source_sha256", "OnnxRuntime", "TensorRTRuntime", "tensorrt_available", "TorchRuntime", "FoldedTorchRuntime",
    "RUNTIME_KINDS", "open_runtime", "register_extra_model_configs",
]
