"""export/tensorrt.py: the pure logic everywhere; real engine builds only where TensorRT + CUDA exist."""
from __future__ import annotations

import importlib.util
import json

import pytest

from clipheads.export.tensorrt import (
    build_strategy,
    engine_compatible,
    engine_name,
    engine_tag,
    parse_version,
    profile_shapes,
)

INPUTS = [{"name": "pixels", "dtype": "uint8", "shape": ["batch", 3, 224, 224]},
          {"name": "task_index", "dtype": "int64", "shape": ["batch"]}]
PROFILE = {"min": 1, "opt": 32, "max": 64}


def _tag(**kw):
    base = dict(gpu_name="Orin", compute_capability=(8, 7), trt_version="10.3.0", precision="fp16",
                profile=PROFILE, onnx_sha256="ab" * 32)
    base.update(kw)
    return engine_tag(**base)


def _here(**kw):
    d = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0", "precision": "fp16",
         "profile": PROFILE, "onnx_sha256": "ab" * 32}
    d.update(kw)
    return d


def test_parse_version():
    assert parse_version("10.3.0.30") == (10, 3, 0)
    assert parse_version("11.0") == (11, 0, 0)
    assert parse_version("10.12.0rc1") == (10, 12, 0)


def test_build_strategy_fp16_flag_on_trt10_strong_typing_on_trt11():
    assert build_strategy("10.3.0", "fp16") == {"onnx": "fp32", "strongly_typed": False, "fp16_flag": True}
    assert build_strategy("11.1.0", "fp16") == {"onnx": "fp16", "strongly_typed": True, "fp16_flag": False}
    assert build_strategy("10.3.0", "fp32")["fp16_flag"] is False
    with pytest.raises(ValueError, match="too old"):
        build_strategy("8.6.1", "fp16")
    with pytest.raises(ValueError, match="int8"):
        build_strategy("10.3.0", "int8")


def test_profile_shapes_replace_only_the_batch_dim():
    shapes = profile_shapes(INPUTS, 1, 32, 64)
    assert shapes["pixels"] == ((1, 3, 224, 224), (32, 3, 224, 224), (64, 3, 224, 224))
    assert shapes["task_index"] == ((1,), (32,), (64,))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes(INPUTS, 4, 2, 64)
    with pytest.raises(ValueError, match="non-batch"):
        profile_shapes([{"name": "tokens", "shape": ["batch", "len"]}], 1, 1, 2)


def test_a_named_dim_with_a_range_gets_its_own_profile():
    rng = {"sequence": (1, 16, 77)}
    shapes = profile_shapes([{"name": "tokens", "shape": ["batch", "sequence"]}], 1, 32, 64, rng)
    assert shapes["tokens"] == ((1, 1), (32, 16), (64, 77))


def test_engine_compatible_same_everything():
    assert engine_compatible(_tag(), _here()) == (True, "compatible")


@pytest.mark.parametrize("change, reason", [
    (dict(compute_capability="8.6", gpu_name="NVIDIA A10"), "compute capability"),
    (dict(gpu_name="Orin Nano"), "built on"),
    (dict(tensorrt_version="10.4.0"), "TensorRT 10.3.0"),
    (dict(onnx_sha256="cd" * 32), "ONNX graph changed"),
    (dict(precision="fp32"), "fp16"),
    (dict(profile={"min": 1, "opt": 8, "max": 16}), "profile"),
])
def test_engine_refused_on_mismatch(change, reason):
    ok, why = engine_compatible(_tag(), _here(**change))
    assert not ok and reason in why


def test_version_compatible_engines_run_on_newer_trt_of_the_same_major():
    tag = _tag(version_compatible=True)
    assert engine_compatible(tag, _here(tensorrt_version="10.8.0"))[0]
    assert not engine_compatible(tag, _here(tensorrt_version="10.2.0"))[0]
    assert not engine_compatible(tag, _here(tensorrt_version="11.0.0"))[0]


def test_engine_tag_is_json_and_names_are_plain():
    json.dumps(_tag())
    assert engine_name("image_0.onnx", "fp16") == "image_0.fp16.plan"


def test_build_engine_command_without_tensorrt_exits_2_with_reason(micro_backbone, tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the refusal path does not apply")
    from clipheads.training.methods import TaskSpec, build_method

    from clipheads.export.cli import main
    from clipheads.export.pipeline import ExportOptions, export_heads

    head = build_method("zeroshot", micro_backbone, (TaskSpec("t", ("a", "b")),))
    res = export_heads([head], tmp_path / "b", ExportOptions(target="tensorrt", probes=8, text=False))
    assert res.passed
    from clipheads.export.optimize import op_counts

    assert not any(k for k in res.manifest["fused_ops"].values() if isinstance(k, dict) and "fused" in k)
    for name in res.manifest["graphs"]:  # TensorRT parses standard ONNX only: no com.microsoft ops
        assert not any(op.startswith("com.microsoft") for op in op_counts(tmp_path / "b" / name)), name
    assert main(["build-engine", str(tmp_path / "b")]) == 2
    assert "tensorrt" in capsys.readouterr().err.lower()


def test_build_engine_refuses_an_onnx_target_bundle(micro_backbone, tmp_path, capsys):
    """Its graphs hold com.microsoft ops TensorRT cannot parse: refused up front (exit 2, with the
    re-export to make), TensorRT installed or not."""
    from clipheads.training.methods import TaskSpec, build_method

    from clipheads.export.cli import main
    from clipheads.export.pipeline import ExportOptions, export_heads

    head = build_method("zeroshot", micro_backbone, (TaskSpec("t", ("a", "b")),))
    assert export_heads([head], tmp_path / "b", ExportOptions(probes=8, text=False)).passed
    assert main(["build-engine", str(tmp_path / "b")]) == 2
    assert "re-export the heads with --target tensorrt" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_engine_on_this_gpu(micro_backbone, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (engines are built on the target GPU)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from clipheads.training.methods import TaskSpec, build_method

    from clipheads.export.bundle import load_bundle
    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.export.tensorrt import build_bundle_engines

    head = build_method("zeroshot", micro_backbone, (TaskSpec("t", ("a", "b")),))
    res = export_heads([head], tmp_path / "b", ExportOptions(target="tensorrt", precision="fp16", probes=8,
                                                              max_batch=8), allow_parity_failure=True)
    rep = build_bundle_engines(tmp_path / "b")
    assert all(v["status"] == "built" for v in rep["engines"].values())
    again = build_bundle_engines(tmp_path / "b")
    assert all(v["status"] == "kept" for v in again["engines"].values())
    m = load_bundle(tmp_path / "b").manifest
    assert m["tensorrt"]["engines"]["image_0.onnx"]["tag"]["gpu_name"] == torch.cuda.get_device_name(0)
    assert res.bundle is not None
    # the serving runtime runs the engine and agrees with ONNX Runtime on the same pixels
    import numpy as np

    from clipheads.serving.runtimes import open_runtime

    trt_rt, ort_rt = open_runtime(tmp_path / "b", "tensorrt"), open_runtime(tmp_path / "b", "onnx-cpu")
    assert trt_rt.name == "tensorrt"
    px = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    (lt, ft), (lo, fo) = trt_rt.run_path(0, px), ort_rt.run_path(0, px)
    cos = (ft * fo).sum(1) / (np.linalg.norm(ft, axis=1) * np.linalg.norm(fo, axis=1))
    margin = np.sort(lo, 1)[:, -1] - np.sort(lo, 1)[:, -2]
    decided = margin > 2 * np.abs(lt - lo).max()  # random pixels on a random-init model: near-ties may flip
    assert cos.min() >= 0.999 and (lt.argmax(1) == lo.argmax(1))[decided].all()


def _manifest(engine_tag_kw=None, onnx_sha="ab" * 32):
    tag = _tag(**(engine_tag_kw or {}))
    return {"graphs": {"image_0.onnx": {"sha256": onnx_sha}, "image_1.onnx": {"sha256": "cd" * 32},
                       "image_0.fp16.plan": {"kind": "engine", "source": "image_0.onnx", "tag": tag}},
            "tensorrt": {"profile": PROFILE, "engines": {"image_0.onnx": {"engine": "image_0.fp16.plan", "tag": tag}}}}


ORIN = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0"}


def test_select_engines_takes_compatible_engines_and_names_every_refusal():
    from clipheads.export.tensorrt import select_engines

    usable, refused = select_engines(_manifest(), ["image_0.onnx"], ORIN)
    assert usable == {"image_0.onnx": "image_0.fp16.plan"} and refused == {}
    usable, refused = select_engines(_manifest(), ["image_0.onnx", "image_1.onnx"], ORIN)
    assert "build-engine" in refused["image_1.onnx"]
    _, refused = select_engines(_manifest(), ["image_0.onnx"], {**ORIN, "gpu_name": "RTX 4090", "compute_capability": "8.9"})
    assert "compute capability 8.7" in refused["image_0.onnx"]
    _, refused = select_engines(_manifest(), ["image_0.onnx"], {**ORIN, "tensorrt_version": "10.4.0"})
    assert "TensorRT 10.3.0" in refused["image_0.onnx"]
    _, refused = select_engines(_manifest(onnx_sha="ef" * 32), ["image_0.onnx"], ORIN)  # graph re-exported
    assert "ONNX graph changed" in refused["image_0.onnx"]


def test_serving_tensorrt_runtime_refuses_clearly_without_tensorrt(micro_backbone, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the refusal path does not apply")
    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.serving.runtimes import RuntimeError_, open_runtime
    from clipheads.training.methods import TaskSpec, build_method

    head = build_method("zeroshot", micro_backbone, (TaskSpec("t", ("red", "blue")),))
    export_heads([head], tmp_path / "b", ExportOptions(target="tensorrt", probes=8, text=False))
    (tmp_path / "b" / "image_0.fp16.plan").write_bytes(b"not an engine")  # engines present, TensorRT absent
    with pytest.raises(RuntimeError_, match="needs the `tensorrt` package"):
        open_runtime(tmp_path / "b", "tensorrt")
    assert open_runtime(tmp_path / "b", "auto").name == "onnx-cpu"  # auto falls through to ORT


def test_the_full_tensorrt_build_must_match_not_only_major_minor_patch():
    ok, why = engine_compatible(_tag(trt_version="10.3.0.26"), _here(tensorrt_version="10.3.0.30"))
    assert not ok and "10.3.0.26" in why and "10.3.0.30" in why


def test_engine_top1_is_judged_as_the_export_gate_judges_it():
    import numpy as np

    from clipheads.export.tensorrt import engine_top1_failure

    rng = np.random.default_rng(0)
    want = rng.normal(0, 3, (128, 4))
    want[0] = [1.0, 1.001, -5, -5]  # a reference near-tie
    noise = rng.normal(0, 1e-3, want.shape)
    coin_flip = want + noise
    coin_flip[0] = [1.001, 1.0, -5, -5]  # flips within the engine's typical error
    raw, why = engine_top1_failure(want, coin_flip, 0.995)
    assert raw == 127 / 128 and why is None  # one coin-flip in ENGINE_PROBES does not discard the engine
    gross = want + noise
    margins = np.sort(want, 1)[:, -1] - np.sort(want, 1)[:, -2]
    decided = int(np.argmax(margins))
    gross[decided, np.argsort(want[decided])[-2]] += margins[decided] + 1.0  # a decided answer overturned
    raw, why = engine_top1_failure(want, gross, 0.995)
    assert raw == 127 / 128 and why and "beyond 2x the typical error" in why


def test_timing_caches_are_one_file_per_device_and_tensorrt_build():
    from clipheads.export.tensorrt import timing_cache_name

    a = timing_cache_name({"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.3.0.26"})
    b = timing_cache_name({"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0.26"})
    c = timing_cache_name({"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0.30"})
    assert len({a, b, c}) == 3 and all("/" not in n and " " not in n and n.endswith(".timing.cache") for n in (a, b, c))


class _FakeConfig:
    """What `_attach_timing_cache` calls on a TensorRT builder config (create/set timing cache)."""

    def __init__(self, bad_blob: bool = False, refuse: bool = False):
        self.bad_blob, self.refuse, self.attached = bad_blob, refuse, []

    def create_timing_cache(self, blob: bytes):
        if blob and self.bad_blob:
            raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed")
        return ("cache", blob)

    def set_timing_cache(self, cache, ignore_mismatch: bool):
        ok = not (self.refuse and cache[1])
        if ok:
            self.attached.append(cache)
        return ok


@pytest.mark.parametrize("kind", ["raises", "refused"])
def test_a_foreign_or_corrupt_timing_cache_gives_way_to_a_fresh_one(tmp_path, kind):
    from clipheads.export.tensorrt import _attach_timing_cache

    path = tmp_path / "trt-x.timing.cache"
    path.write_bytes(b"from another device")
    cfg = _FakeConfig(bad_blob=kind == "raises", refuse=kind == "refused")
    notes = []
    cache = _attach_timing_cache(cfg, path, notes.append)
    assert cache == ("cache", b"") and cfg.attached == [("cache", b"")]
    assert bool(notes) == (kind == "raises")
    good = _FakeConfig()
    assert _attach_timing_cache(good, path, notes.append) == ("cache", b"from another device")


def test_an_engine_that_does_not_load_is_a_reason_and_auto_falls_back(micro_backbone, tmp_path, monkeypatch):
    """The tag matched but deserialisation failed (TensorRT has no preflight check): --runtime
    tensorrt refuses with TensorRT's reason, auto serves on ONNX Runtime."""
    import sys
    import types

    from clipheads.export import tensorrt as trt_mod
    from clipheads.export.pipeline import ExportOptions, export_heads
    from clipheads.serving.runtimes import RuntimeError_, open_runtime
    from clipheads.training.methods import TaskSpec, build_method

    head = build_method("zeroshot", micro_backbone, (TaskSpec("t", ("red", "blue")),))
    export_heads([head], tmp_path / "b", ExportOptions(target="tensorrt", probes=8, text=False))
    (tmp_path / "b" / "image_0.fp16.plan").write_bytes(b"not an engine")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # importable, so engines are tried
    monkeypatch.setattr(trt_mod, "current_device", lambda *a: dict(ORIN))
    monkeypatch.setattr(trt_mod, "select_engines", lambda m, graphs, here: ({g: "image_0.fp16.plan" for g in graphs}, {}))

    def fails_to_deserialize(path, max_batch):
        raise RuntimeError(f"{path}: TensorRT could not deserialize the engine")

    monkeypatch.setattr(trt_mod, "Engine", fails_to_deserialize)
    with pytest.raises(RuntimeError_, match="did not load here.*could not deserialize"):
        open_runtime(tmp_path / "b", "tensorrt")
    assert open_runtime(tmp_path / "b", "auto").name == "onnx-cpu"
