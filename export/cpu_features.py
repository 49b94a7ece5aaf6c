"""Which int8 dot-product instructions this CPU has (Linux x86: /proc/cpuinfo flags; {} elsewhere).

Why it is recorded: static int8 graphs carry full 8-bit weights (quantize.py), and ONNX Runtime's
int8 GEMM sums u8 x s8 products exactly with AVX-512 VNNI, AVX-VNNI or AMX, but in saturating 16-bit
pairs (vpmaddubsw) with AVX2 alone. A bundle gated on a VNNI machine can answer differently on one
without, so the manifest names the exporting CPU and the ONNX runtime warns where the instructions differ.
"""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def int8_features() -> dict:
    """{"cpu": model name, "vnni": AVX-512 VNNI or AVX-VNNI, "amx_int8": AMX-INT8}, or {} when
    the flags cannot be read (not Linux, not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "model name" and not model:
            model = value.strip()
    if not flags:
        return {}
    return {"cpu": model, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx_int8": "amx_int8" in flags}


def exact_int8_sums(features: dict) -> bool:
    """Whether ORT's int8 GEMM sums exactly on a CPU with these features (see the module doc)."""
    return bool(features.get("vnni") or features.get("amx_int8"))
