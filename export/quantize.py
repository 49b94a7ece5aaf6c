"""INT8 for CPU (ECOSYSTEM.md 3.2).

* `quantize_dynamic_int8`: weights int8 per output channel, activations quantised on the fly
  (MatMul/Gemm with constant B), clip-as-service's recipe (`reduce_range` keeps u8s8 VNNI-less
  CPUs exact-overflow-free).
* `quantize_static_qdq`: QDQ format with calibration on seeded probe images (MinMax); optional.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def quantize_dynamic_int8(src: str | Path, dst: str | Path, per_channel: bool = True, reduce_range: bool = True) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(  # DefaultTensorType: shape inference cannot type outputs of contrib ops (fused graphs)
        str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return Path(dst)


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8/float probe batches."""

    def __init__(self, pixels: np.ndarray, task_indices: list[int], batch: int = 4):
        self._feeds = iter([
            {"pixels": pixels[i:i + batch], "task_index": np.full(len(pixels[i:i + batch]), k, np.int64)}
            for k in task_indices for i in range(0, len(pixels), batch)
        ])

    def get_next(self) -> Optional[dict]:
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        raise NotImplementedError


def quantize_static_qdq(src: str | Path, dst: str | Path, calib_pixels: np.ndarray, task_indices: list[int],
                        per_channel: bool = True) -> Path:
    """Static QDQ (activations uint8, weights int8) calibrated on `calib_pixels` for each bank row."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = Path(dst).with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        src_q = pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        src_q = Path(src)
    quantize_static(
        str(src_q), str(dst), _Calibration(calib_pixels, task_indices), quant_format=QuantFormat.QDQ,
        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True},
    )
    if pre.exists():
        pre.unlink()
    return Path(dst)
