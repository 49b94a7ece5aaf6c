"""TensorRT engines for a bundle, built on the machine that runs them (ECOSYSTEM.md 3.3, 3.4).

`tensorrt` (and CUDA) are imported lazily: everything above `build_engine` is pure logic and is
unit-tested without a GPU. The engine build follows the TensorRT 10/11 Python API:

    builder.create_network(flags)               # explicit batch is the only mode in TRT 10+
    OnnxParser(network, logger).parse_from_file(path)
    config.set_memory_pool_limit(WORKSPACE, ...)
    profile.set_shape(name, min, opt, max)       # one profile spanning 1..max_batch
    config.set_timing_cache(cache)              # one file per device + TRT version, reused across builds
    FP16: TRT 10 -> BuilderFlag.FP16 on the fp32 graph (weak typing)
          TRT 11 -> the bundle's *.fp16.onnx built with NetworkDefinitionCreationFlag.STRONGLY_TYPED
                    (TRT 11 removed BuilderFlag.FP16)
    builder.build_serialized_network(network, config)

Each engine is tagged with (GPU name, compute capability, TensorRT version, precision, profile,
sha256 of the ONNX it came from) and gated like the export: each new engine runs the seeded probes
against ONNX Runtime on the bundle's fp32 graph (fp32: |delta logit| <= 1e-3, TF32 off; fp16:
cosine >= 0.999, top-1 >= 99.5 %, judged as the export gate judges real images: flips all within
the engine's typical error count through the expected agreement, over 128 probes per task); a failing engine is discarded and the
command exits 1. Only the image graphs get engines: the serving runtime keeps the text graph on
ONNX Runtime (its tokens are few and its calls rare), so a text engine would be built for nothing.
`engine_compatible(tag, current)` decides whether an engine
found in a bundle may run here. Incompatible engines are rebuilt by `build-engine`; a runtime
that cannot rebuild must refuse them with the reason.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from . import bundle as bundle_io

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


class TensorRTUnavailable(RuntimeError):
    """`tensorrt` or a CUDA GPU is not available on this machine."""


# ---- pure logic -----------------------------------------------------------------------------
def parse_version(v: str) -> tuple[int, ...]:
    import re

    out = []
    for part in str(v).split(".")[:3]:
        lead = re.match(r"\d*", part).group(0)  # "0rc1" -> 0
        out.append(int(lead) if lead else 0)
    return tuple(out + [0] * (3 - len(out)))


def build_strategy(trt_version: str, precision: str) -> dict:
    """How to build `precision` with this TensorRT: which ONNX variant, strong typing, FP16 flag."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"TensorRT engines are built as fp32 or fp16, not {precision!r}")
    major = parse_version(trt_version)[0]
    if major < 10:
        raise ValueError(f"TensorRT {trt_version} is too old: bundles need TensorRT >= 10 (JetPack 6 ships 10.3)")
    if precision == "fp32":
        return {"onnx": "fp32", "strongly_typed": major >= 11, "fp16_flag": False}
    if major >= 11:  # BuilderFlag.FP16 is gone: the graph's own types decide
        return {"onnx": "fp16", "strongly_typed": True, "fp16_flag": False}
    return {"onnx": "fp32", "strongly_typed": False, "fp16_flag": True}


def profile_shapes(inputs: list[dict], min_batch: int, opt_batch: int, max_batch: int,
                   ranges: Optional[Mapping[str, tuple[int, int, int]]] = None) -> dict:
    """{input: (min, opt, max)} shapes from a manifest graph's inputs; the batch dim is dynamic,
    and so is any other named dim given a (min, opt, max) in `ranges` (the text graph's "sequence")."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min <= opt <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    ranges = dict(ranges or {})
    out = {}
    for inp in inputs:
        rest = []
        for d in list(inp["shape"])[1:]:
            if isinstance(d, int):
                rest.append((d, d, d))
            elif d in ranges:
                rest.append(tuple(int(v) for v in ranges[d]))
            else:
                raise ValueError(f"input {inp['name']!r} has a dynamic non-batch dim {d!r}; engines need static ones")
        out[inp["name"]] = tuple(tuple([b] + [r[k] for r in rest]) for k, b in enumerate((min_batch, opt_batch, max_batch)))
    return out


def engine_tag(gpu_name: str, compute_capability: tuple[int, int] | str, trt_version: str, precision: str,
               profile: Mapping[str, int], onnx_sha256: str, version_compatible: bool = False) -> dict:
    cc = compute_capability if isinstance(compute_capability, str) else f"{compute_capability[0]}.{compute_capability[1]}"
    return {"gpu_name": gpu_name, "compute_capability": cc, "tensorrt_version": str(trt_version),
            "precision": precision, "profile": dict(profile), "onnx_sha256": onnx_sha256,
            "version_compatible": bool(version_compatible)}


def engine_compatible(tag: Mapping, current: Mapping) -> tuple[bool, str]:
    """Can an engine tagged `tag` run where `current` describes (same keys as engine_tag)?

    Engines are tied to the GPU model and the exact TensorRT version (unless built
    version-compatible, then any newer TRT of the same major runs them). The ONNX it was built
    from, the precision and the batch profile must match what the bundle asks for now."""
    for key in ("gpu_name", "compute_capability", "tensorrt_version", "precision", "onnx_sha256"):
        if key not in tag:
            return False, f"engine tag has no {key!r}"
    if tag["compute_capability"] != current.get("compute_capability"):
        return False, (f"built for compute capability {tag['compute_capability']} ({tag['gpu_name']}), "
                       f"this GPU is {current.get('compute_capability')} ({current.get('gpu_name')})")
    if tag["gpu_name"] != current.get("gpu_name"):
        return False, f"built on {tag['gpu_name']!r}, this GPU is {current.get('gpu_name')!r}"
    built, now = parse_version(tag["tensorrt_version"]), parse_version(current.get("tensorrt_version", "0"))
    if tag.get("version_compatible"):
        if built[0] != now[0] or now < built:
            return False, f"version-compatible engine from TensorRT {tag['tensorrt_version']} cannot run on {current.get('tensorrt_version')}"
    elif str(tag["tensorrt_version"]) != str(current.get("tensorrt_version")):  # the full build: 10.3.0.26 != 10.3.0.30
        return False, f"built with TensorRT {tag['tensorrt_version']}, this machine has {current.get('tensorrt_version')}"
    if tag["onnx_sha256"] != current.get("onnx_sha256"):
        return False, "the ONNX graph changed since the engine was built"
    if "precision" in current and tag["precision"] != current["precision"]:
        return False, f"engine is {tag['precision']}, {current['precision']} requested"
    if "profile" in current and dict(tag.get("profile") or {}) != dict(current["profile"]):
        return False, f"engine batch profile {tag.get('profile')} != requested {current['profile']}"
    return True, "compatible"


def engine_name(graph: str, precision: str) -> str:
    return graph.replace(".onnx", f".{precision}.plan")


# ---- TensorRT / CUDA ------------------------------------------------------------------------
def _import_trt():
    try:
        import tensorrt as trt
    except Exception as err:  # noqa: BLE001
        raise TensorRTUnavailable(
            f"the `tensorrt` Python package is not importable here ({type(err).__name__}: {err}); "
            "build engines on the target GPU / Jetson (JetPack ships TensorRT), e.g. pip install tensorrt"
        ) from None
    return trt


def current_device(trt_version: Optional[str] = None) -> dict:
    """GPU name, compute capability and TensorRT version of this machine."""
    trt = _import_trt()
    try:
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA GPU visible (torch.cuda.is_available() is False)")
        index = torch.cuda.current_device()  # where engines deserialize and run, not always GPU 0
        name = torch.cuda.get_device_name(index)
        cc = torch.cuda.get_device_capability(index)
    except ImportError:  # pragma: no cover - torch is a dependency
        raise TensorRTUnavailable("cannot query the GPU without torch.cuda") from None
    return {"gpu_name": name, "compute_capability": f"{cc[0]}.{cc[1]}", "tensorrt_version": trt_version or trt.__version__}


_LOGGER = None


def _logger(trt):
    """One TensorRT logger per process (TensorRT keeps the first it sees and warns about others)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _opset(onnx_path) -> str:
    try:
        from .onnx_export import graph_io

        return str(graph_io(onnx_path).get("opset"))
    except Exception:  # noqa: BLE001 - only for an error message
        return "?"


def timing_cache_name(device: Mapping) -> str:
    """The timing cache file for one GPU model and TensorRT build: a cache is only valid for the
    device and exact TensorRT version that made it, so a bundle built on several devices keeps one each."""
    import re

    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device['gpu_name']}-sm{device['compute_capability']}-trt{device['tensorrt_version']}")
    return f"trt-{slug.strip('-')}.timing.cache"


def _attach_timing_cache(config, path: Path, log: Callable[[str], None]):
    """The timing cache from `path` when TensorRT accepts it, else a fresh one (a stale or foreign
    cache costs build time, never the build)."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    except Exception as err:  # noqa: BLE001 - TensorRT raises on a corrupt blob
        log(f"timing cache {path.name} not usable ({err}); starting a fresh one")
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(onnx_path: str | Path, engine_path: str | Path, shapes: Mapping[str, tuple], precision: str = "fp16",
                 workspace_gb: float = 2.0, timing_cache: Optional[str | Path] = None,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    """Build and serialise one engine. Returns build info (strategy, seconds)."""
    trt = _import_trt()
    strategy = build_strategy(trt.__version__, precision)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if strategy["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve beside it
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path} (ONNX opset "
                           f"{_opset(onnx_path)}; TensorRT 10.0's parser reads opsets 9-20): {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if strategy["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would miss the fp32 gate (1e-3 logits)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = _attach_timing_cache(config, Path(timing_cache), log)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))
    return {"strategy": strategy, "build_s": round(time.perf_counter() - t0, 2)}


def select_engines(manifest: Mapping, graphs: list[str], current: Mapping) -> tuple[dict, dict]:
    """Which of `graphs` have an engine in the bundle that may run on `current` (gpu_name,
    compute_capability, tensorrt_version)? Returns ({graph: engine file}, {graph: reason refused}).
    Besides the device, the engine's tag must name the ONNX the manifest lists now (a re-exported
    graph invalidates its engine); precision and profile are whatever the engine was built with."""
    engines = (manifest.get("tensorrt") or {}).get("engines") or {}
    usable, refused = {}, {}
    for graph in graphs:
        entry = engines.get(graph)
        if not entry:
            refused[graph] = "no engine built (run `clipheads export build-engine BUNDLE` on this device)"
            continue
        tag = entry.get("tag") or {}
        source = (manifest.get("graphs", {}).get(entry.get("engine", ""), {}) or {}).get("source", graph)
        onnx_sha = (manifest.get("graphs", {}).get(source) or {}).get("sha256")
        ok, why = engine_compatible(tag, {**current, "onnx_sha256": onnx_sha})
        if ok:
            usable[graph] = entry["engine"]
        else:
            refused[graph] = why
    return usable, refused


class Engine:
    """A deserialized engine with one execution context, run on CUDA in chunks <= max_batch
    (torch tensors as device buffers). Not thread-safe: one caller at a time."""

    def __init__(self, engine_path: str | Path, max_batch: int):
        import torch

        trt = _import_trt()
        self._trt, self._torch, self.path, self.max_batch = trt, torch, Path(engine_path), int(max_batch)
        self._runtime = trt.Runtime(_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.ctx = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                       if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT}

    def __call__(self, feeds: Mapping[str, "np.ndarray"], outputs: list[str]) -> dict:
        import numpy as np

        torch, trt, ctx = self._torch, self._trt, self.ctx
        n = len(next(iter(feeds.values())))
        chunks: dict[str, list] = {o: [] for o in outputs}
        for i in range(0, n, self.max_batch):
            bufs = {}
            with torch.cuda.stream(self.stream):  # copies, buffers and the engine on one stream: ordered
                for name, arr in feeds.items():
                    t = torch.from_numpy(np.ascontiguousarray(arr[i:i + self.max_batch])).cuda()
                    if not ctx.set_input_shape(name, tuple(t.shape)):
                        raise RuntimeError(f"{self.path}: input {name} of shape {tuple(t.shape)} is outside the "
                                           f"engine's profile {self.engine.get_tensor_profile_shape(name, 0)}")
                    ctx.set_tensor_address(name, t.data_ptr())
                    bufs[name] = t
                for name in outputs:
                    dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                    t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
                    ctx.set_tensor_address(name, t.data_ptr())
                    bufs[name] = t
                if not ctx.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError(f"{self.path}: execute_async_v3 failed")
            self.stream.synchronize()
            for name in outputs:
                chunks[name].append(bufs[name].float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in chunks.items()}


def run_engine(engine_path: str | Path, feeds: Mapping[str, "np.ndarray"], outputs: list[str],
               max_batch: int) -> dict:
    """Run a serialized engine once (deserialize, run in chunks <= max_batch)."""
    return Engine(engine_path, max_batch)(feeds, outputs)


# probes per task for an engine's gate: enough that one coin-flip answer (a reference near-tie)
# leaves the expected agreement above fp16's 99.5 % (1 - 0.5/128 = 99.6 %)
ENGINE_PROBES = 128


def engine_top1_failure(want: "np.ndarray", got: "np.ndarray", min_top1: float) -> tuple[float, Optional[str]]:
    """(raw top-1 agreement, why the engine fails top-1 or None), judged as the export gate judges
    a task on real images (`parity.task_agreement` + `real_gate_failure`): flips all within the
    engine's typical error are judged on the expected agreement, so one coin-flip answer in
    `ENGINE_PROBES` does not discard a good engine, while a flip beyond it still does."""
    from .parity import real_gate_failure, task_agreement

    a = task_agreement(want, got)
    return a["top1_agreement"], real_gate_failure(a, min_top1)


def engine_parity(b: "bundle_io.Bundle", graph: str, engine_path: str | Path, precision: str, max_batch: int) -> dict:
    """An image graph's engine vs ONNX Runtime (CPU, the bundle's fp32 graph) on seeded probes; the
    export's gates."""
    import numpy as np
    import onnxruntime as ort

    from .parity import GATES, probe_images

    m = b.manifest
    sess = ort.InferenceSession(str(b.path(graph)), providers=["CPUExecutionProvider"])
    gate = GATES[precision]
    failures, report = [], {"precision": precision, "reference": "onnxruntime CPU on " + graph}
    pre = m["preprocess"]
    px, _ = probe_images(int(pre["image_size"]), ENGINE_PROBES, seed=7)
    if pre.get("input_dtype") == "float32":
        mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
        px = ((px.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    rows = sorted({t["task_index"] for t in m["tasks"] if t["graph"] == graph})
    px = np.concatenate([px] * len(rows))
    feeds = {"pixels": px, "task_index": np.repeat(np.asarray(rows, np.int64), ENGINE_PROBES)}
    outs = ["logits", "features"]
    want = dict(zip(outs, sess.run(outs, feeds)))
    got = run_engine(engine_path, feeds, outs, max_batch)
    f_w, f_g = want["features"], got["features"]
    cos = float(((f_w * f_g).sum(1) / (np.linalg.norm(f_w, axis=1) * np.linalg.norm(f_g, axis=1))).min())
    report["min_feature_cosine"] = cos
    report["max_abs_logit_diff"] = float(np.abs(want["logits"] - got["logits"]).max())
    top1 = []
    for t in (t for t in m["tasks"] if t["graph"] == graph):
        a, z = t["logit_slice"]
        sel = feeds["task_index"] == t["task_index"]
        raw, why = engine_top1_failure(want["logits"][sel, a:z], got["logits"][sel, a:z], gate.min_top1)
        top1.append(raw)
        if why:
            failures.append(f"{t['name']}: {why}")
    report["min_top1_agreement"] = min(top1)
    if gate.max_abs_logit is not None and report["max_abs_logit_diff"] > gate.max_abs_logit:
        failures.append(f"max |delta logit| {report['max_abs_logit_diff']:.3g} > {gate.max_abs_logit}")
    min_cos = gate.min_cosine if gate.min_cosine is not None else 0.9999
    if cos < min_cos:
        failures.append(f"min feature cosine {cos:.5f} < {min_cos}")
    report.update(passed=not failures, failures=failures)
    return report


class EngineParityError(RuntimeError):
    """A freshly built engine failed its parity gate (it was not added to the bundle)."""


def build_bundle_engines(root: str | Path, workspace_gb: float = 2.0, timing_cache: Optional[str | Path] = None,
                         precision: Optional[str] = None, force: bool = False,
                         log: Callable[[str], None] = lambda m: None) -> dict:
    """Build (or keep, when compatible) one engine per graph of the bundle, on this machine."""
    b = bundle_io.load_bundle(root)
    m = dict(b.manifest)
    if m.get("target") != "tensorrt":  # onnx-target graphs hold ORT contrib ops (and int8 QDQ) TensorRT cannot parse
        raise ValueError(f"{b.root} was exported for {m.get('target')!r}, not TensorRT; re-export the heads with "
                         "--target tensorrt (fp32 or fp16) and build engines from that bundle")
    precision = precision or ("fp16" if m.get("precision") == "fp16" else "fp32")
    trt = _import_trt()
    here = current_device(trt.__version__)
    prof = (m.get("tensorrt") or {}).get("profile") or {"min": 1, "opt": 32, "max": int(m.get("max_batch", 64))}
    engines = dict((m.get("tensorrt") or {}).get("engines") or {})
    cache = Path(timing_cache) if timing_cache else b.root / timing_cache_name(here)
    report = {}
    for graph in b.image_graphs():  # the text graph stays on ONNX Runtime (module doc)
        gprec = precision
        strategy = build_strategy(here["tensorrt_version"], gprec)
        src = graph.replace(".onnx", ".fp16.onnx") if strategy["onnx"] == "fp16" else graph
        if src not in m["graphs"]:
            raise ValueError(f"{graph}: TensorRT {here['tensorrt_version']} builds fp16 strongly typed from {src}, "
                             "which this bundle lacks; re-export with --target tensorrt --precision fp16")
        want = {**here, "precision": gprec, "profile": prof, "onnx_sha256": m["graphs"][src]["sha256"]}
        old = engines.get(graph)
        if old and not force and (b.root / old["engine"]).is_file():
            ok, why = engine_compatible(old["tag"], want)
            if ok:
                report[graph] = {"status": "kept", "engine": old["engine"]}
                continue
            log(f"{graph}: existing engine not usable here ({why}); rebuilding")
        shapes = profile_shapes(m["graphs"][src]["inputs"], prof["min"], prof["opt"], prof["max"])
        out = b.root / f".{engine_name(graph, gprec)}.build"
        log(f"{graph}: building {gprec} engine from {src} ({strategy})")
        info = build_engine(b.root / src, out, shapes, gprec, workspace_gb, cache, log)
        info["parity"] = engine_parity(b, graph, out, gprec, prof["max"])
        if not info["parity"]["passed"]:
            out.unlink(missing_ok=True)
            report[graph] = {"status": "parity-failed", **info}
            log(f"{graph}: engine parity FAILED ({'; '.join(info['parity']['failures'])}); engine discarded")
            continue
        tag = engine_tag(here["gpu_name"], here["compute_capability"], here["tensorrt_version"], gprec, prof,
                         m["graphs"][src]["sha256"])
        name = engine_name(graph, gprec)
        m = bundle_io.add_file(b.root, m, name, out, kind="engine", precision=gprec, tag=tag, source=src)
        out.unlink(missing_ok=True)
        engines[graph] = {"engine": name, "tag": tag, **info}
        m["tensorrt"] = {**(m.get("tensorrt") or {}), "engines": engines}
        bundle_io.update_manifest(b.root, m)
        report[graph] = {"status": "built", "engine": name, **info}
    failed = [g for g, r in report.items() if r["status"] == "parity-failed"]
    if failed:
        raise EngineParityError(f"engine parity failed for {', '.join(failed)}: "
                                + "; ".join(f"{g}: {report[g]['parity']['failures']}" for g in failed))
    return {"bundle": str(b.root), "device": here, "engines": report}
