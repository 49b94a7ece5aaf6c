"""One export run: fold -> ONNX -> optimise / convert -> parity gate -> bundle (or nothing).

`export_heads` is the library call behind `clipheads export`; it never sees argparse.
"""
from __future__ import annotations

import contextlib
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from clipheads.training.backbone import PreprocessSpec
from clipheads.training.methods.base import HeadMethod
from clipheads.training.text_length import LENGTH_BUCKET

from . import bundle as bundle_io
from .attention import fused_attention
from .fold import FoldPlan, fold_heads
from .onnx_export import DEFAULT_OPSET, export_image_graph, export_text_graph
from .gate_images import MIN_SPLIT, ImageSet, gate_and_calibration, split_selection
from .parity import GATE_MODES, agreement, check_parity, gate_mode_for
from .quantize import Int8Recipe

TARGETS = ("onnx", "tensorrt")
# The text graph stays fp32 in fp16 bundles: label embeddings are computed once per label set and
# cached, and ORT 1.32's CPU provider crashes (SIGSEGV) on the fp16-converted text tower.
TEXT_STAYS_FP32 = True
PRECISIONS = ("fp32", "fp16", "int8")
# --opset each exporter writes graphs for (measured with torch 2.14, onnx 1.23, ORT 1.32): below 14 the
# TorchScript exporter has no scaled_dot_product_attention; above 23 it refuses the opset. The dynamo
# exporter raises anything below 18 to 18, and past 25 writes graphs onnx's checker rejects.
OPSETS = {"torchscript": (14, 23), "dynamo": (14, 25)}


# The options only static int8 reads (flag, ExportOptions field): refused elsewhere unless at their defaults.
STATIC_INT8_FLAGS = (("--calibration-images", "calibration_images"), ("--selection-images", "selection_images"),
                     ("--calibration-method", "calibration_method"), ("--int8-keep", "int8_keep"),
                     ("--int8-activations", "int8_activations"))
MIN_INT8_IMAGES = MIN_SPLIT  # calibration images, and held-out selection images when there are any


class ExportUsageError(ValueError):
    """An option combination this exporter refuses (exit code 2)."""


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"  # onnx: ORT-fused graphs | tensorrt: plain opset-17 graphs for trt
    precision: str = "fp32"
    max_batch: int = 64  # recorded for runtimes; TensorRT profile max
    opt_batch: Optional[int] = None  # TensorRT profile opt (default: max_batch // 2, >= 1)
    input_dtype: str = "uint8"
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"
    # Target onnx, from CPU measurements (bench/export/results.md, bench/serving/results):
    # * fuse: onnxruntime.transformers' offline fusions; None = for fp16 (the GPU precision) only: on
    #   the CPU ORT's own load-time fusions were as fast or faster, and fp32/int8 manifests report those.
    # * fused_attention: vision attention as one com.microsoft.MultiHeadAttention node. Timed
    #   settled (bench/export/int8_speed-amd-settled.md), fp32 ViT-B/32 / B/16 run 1.06x / 1.13x the
    #   plain graph at batch 1 and 1.00x / 1.06x at batch 16 (older back-to-back runs showed batch 1
    #   slower: the previous variant's spinning threads); off = plain opset-17 attention.
    fuse: Optional[bool] = None
    fused_attention: bool = True
    # int8 (issue 17.3): static = calibrated QDQ with the most sensitive MatMuls kept fp32 (quantize.py);
    # dynamic = activations quantized on the fly (the recipe before: 98.7% top-1 on the world)
    int8_mode: str = "static"
    calibration_images: int = 128  # drawn like the gate's images, never the same ones
    selection_images: int = 128  # held out from calibration: what the int8 search scores its graphs on
    calibration_method: str = "minmax"  # minmax | percentile | entropy
    int8_keep: Optional[int] = None  # None: as few fp32 MatMuls as reach the target; k: the k most sensitive
    int8_activations: str = "auto"  # auto | per-tensor | per-row (quantize.Int8Recipe.activations)
    text: bool = True
    probes: int = 256  # real gate images (gate_images.py)
    probe_seed: int = 0
    image_source: str = "auto"  # auto: the heads' training/validation images, else the world | world
    gate: str = "auto"  # auto | real | random-init (parity.py)

    @property
    def offline_fusions(self) -> bool:
        """Offline transformer fusions (never on int8 graphs: quantization comes first)."""
        return (self.target == "onnx" and self.precision != "int8"
                and (self.precision == "fp16" if self.fuse is None else self.fuse))

    @property
    def attention_op(self) -> bool:
        """Fused vision attention: a TorchScript symbolic (attention.py), so not under dynamo."""
        return self.target == "onnx" and self.fused_attention and self.exporter == "torchscript"

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ExportUsageError(f"--target must be one of {TARGETS}, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise ExportUsageError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fuse and self.precision == "int8":
            raise ExportUsageError("--fuse does not apply to int8 graphs (quantization runs on the plain graph; "
                                   "ONNX Runtime fuses the int8 graph at load time): drop --fuse")
        if self.target == "tensorrt" and self.precision == "int8":
            raise ExportUsageError("TensorRT int8 needs explicit Q/DQ calibration (TRT >= 10.1 deprecates "
                                   "implicit int8); export --target tensorrt --precision fp16 or fp32")
        if self.int8_mode not in ("dynamic", "static"):
            raise ExportUsageError(f"int8 mode must be dynamic or static, got {self.int8_mode!r}")
        if self.precision != "int8" and self.int8_mode != "static":
            raise ExportUsageError(f"--int8-mode {self.int8_mode} applies to --precision int8, not {self.precision}")
        if self.exporter not in OPSETS:
            raise ExportUsageError(f"--exporter must be one of {tuple(OPSETS)}, got {self.exporter!r}")
        low, high = OPSETS[self.exporter]
        if not low <= self.opset <= high:
            raise ExportUsageError(f"--opset must be in {low}..{high} for the {self.exporter} exporter, "
                                   f"got {self.opset}")
        if not 1 <= self.max_batch <= 65536:
            raise ExportUsageError(f"--max-batch must be in 1..65536, got {self.max_batch}")
        if self.probes < 4:
            raise ExportUsageError("the parity gate needs at least 4 probe images")
        if self.image_source not in ("auto", "world"):
            raise ExportUsageError(f"image source must be auto or world, got {self.image_source!r}")
        if self.gate not in ("auto",) + GATE_MODES:
            raise ExportUsageError(f"--gate must be auto, real or random-init, got {self.gate!r}")
        for flag, value in (("--calibration-images", self.calibration_images),
                            ("--selection-images", self.selection_images), ("--int8-keep", self.int8_keep)):
            if value is not None and value < 0:
                raise ExportUsageError(f"{flag} must be >= 0, got {value}")
        if not (self.precision == "int8" and self.int8_mode == "static"):
            # accepted and ignored, these would read as applied: refused unless left at their defaults
            changed = [flag for flag, attr in STATIC_INT8_FLAGS
                       if getattr(self, attr) != ExportOptions.__dataclass_fields__[attr].default]
            if changed:
                where = (f"--precision {self.precision}" if self.precision != "int8"
                         else f"--int8-mode {self.int8_mode}")
                raise ExportUsageError(f"{', '.join(changed)} appl{'y' if len(changed) > 1 else 'ies'} to static "
                                       f"int8 only (--precision int8 --int8-mode static), not {where}: drop "
                                       f"{'them' if len(changed) > 1 else 'it'}")
        else:
            # fewer would be silently overridden (split_selection holds nothing out below 8 a side)
            if self.calibration_images < MIN_INT8_IMAGES:
                raise ExportUsageError(f"static int8 needs at least {MIN_INT8_IMAGES} calibration images "
                                       f"(--calibration-images), got {self.calibration_images}")
            if 0 < self.selection_images < MIN_INT8_IMAGES:
                raise ExportUsageError(f"--selection-images must be 0 (score the int8 search on the calibration "
                                       f"images) or at least {MIN_INT8_IMAGES}, got {self.selection_images}")
            try:
                self.int8_recipe().validate()
            except ValueError as err:
                raise ExportUsageError(str(err)) from None

    def int8_recipe(self) -> Int8Recipe:
        return Int8Recipe(mode=self.int8_mode, calibrate_method=self.calibration_method, keep=self.int8_keep,
                          activations=self.int8_activations)


@dataclass
class ExportResult:
    passed: bool
    bundle: Optional[Path]
    manifest: dict
    parity: dict
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        w = self.parity.get("worst", {})
        where = str(self.bundle) if self.bundle else "no bundle written"
        return (f"{'PASS' if self.passed else 'FAIL'} {self.manifest.get('precision')} "
                f"{len(self.manifest.get('tasks', []))} task(s), {len(self.manifest.get('image_graphs', {}))} image graph(s): "
                f"max|dlogit| {w.get('max_abs_logit_diff', float('nan')):.2e}, "
                f"top-1 {w.get('min_top1_agreement', float('nan')):.2%}, "
                f"cos {w.get('min_feature_cosine', float('nan')):.5f} -> {where}")


def runtime_versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import open_clip
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "open_clip": open_clip.__version__, "numpy": numpy.__version__}


def _package_version() -> str:
    try:
        from clipheads.training import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def build_manifest(plan: FoldPlan, options: ExportOptions, heads_meta: Sequence[dict]) -> dict:
    bb = plan.backbone
    pre = plan.preprocess.to_json()
    pre["input_dtype"] = options.input_dtype
    opt = options.opt_batch or max(1, options.max_batch // 2)
    return {
        "format": bundle_io.FORMAT, "format_version": bundle_io.FORMAT_VERSION,
        "package_version": _package_version(),
        "created_unix": int(time.time()),
        "target": options.target, "precision": options.precision, "opset": options.opset,
        "exporter": options.exporter, "max_batch": options.max_batch,
        "runtime_versions": runtime_versions(),
        "preprocess": pre,
        "backbone": bb.record(),  # everything that defines the backbone's forward (training/backbone_record.py)
        "logit_scale": plan.logit_scale,
        "heads": list(heads_meta),
        "tasks": [t.to_json() for t in plan.tasks],
        "image_graphs": {g.name: {"kind": g.kind, "bank_size": g.encoder.bank_size,
                                  "num_logits": int(g.encoder.class_matrix.shape[0])} for g in plan.graphs},
        "text": ({"graph": "text.onnx", "context_length": bb.context_length, "tokenizer": bb.arch,
                  # the image graph whose features live in the plain text tower's space (None: no plain path)
                  "image_graph": next((g.name for g in plan.graphs if g.kind == "plain"), None),
                  **text_length_contract(plan)}
                 if options.text else {}),
        "tensorrt": {"profile": {"min": 1, "opt": min(opt, options.max_batch), "max": options.max_batch},
                     "engines": {}},
    }


def text_length_contract(plan: FoldPlan) -> dict:
    """How a runtime feeds the text graph (BUNDLE.md): `sequence` "dynamic" = tokens may be cut to
    `text_length(tokens, pool.type, pool.eos_id, bucket=length_bucket)` columns (same features);
    "fixed" = always the full context."""
    pool_type, eos_id = plan.backbone.text_pool
    if not plan.text.variable_length:
        return {"sequence": "fixed"}
    return {"sequence": "dynamic", "length_bucket": LENGTH_BUCKET, "pool": {"type": pool_type, "eos_id": eos_id}}


def export_heads(
    heads: Sequence[HeadMethod],
    out: Optional[str | Path],
    options: ExportOptions = ExportOptions(),
    heads_meta: Optional[Sequence[dict]] = None,
    preprocess: Optional[PreprocessSpec] = None,
    allow_parity_failure: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    workdir: Optional[str | Path] = None,
) -> ExportResult:
    """Fold `heads`, export, optimise, gate, and write the bundle to `out` when the gate passes
    (or `allow_parity_failure`). `out=None` runs everything but writes nothing."""
    options.validate()
    if out is not None:
        bundle_io.check_writable(out)  # before the export, not after it
    timings: dict = {}
    t0 = time.perf_counter()
    plan = fold_heads(heads, options.input_dtype, preprocess)
    timings["fold_s"] = time.perf_counter() - t0
    log(f"folded {len(heads)} head(s), {len(plan.tasks)} task(s) into {len(plan.graphs)} image graph(s)")
    heads_meta = list(heads_meta or [{"method": h.name, "config": h.config.to_dict(),
                                      "tasks": [t.name for t in h.tasks]} for h in heads])
    manifest = build_manifest(plan, options, heads_meta)
    t0 = time.perf_counter()
    static_int8 = options.precision == "int8" and options.int8_mode == "static"
    n_calib = options.calibration_images + options.selection_images if static_int8 else 0
    gate_set, calib_set = gate_and_calibration(heads, plan.preprocess, options.probes, n_calib,
                                               options.probe_seed, options.image_source)
    select_set = None
    if calib_set is not None:
        calib_set, select_set = split_selection(calib_set, options.selection_images)
    mode = gate_mode_for(plan.backbone.record(), options.gate)
    timings["images_s"] = time.perf_counter() - t0
    log(f"gate: {len(gate_set.pixels)} images from the {gate_set.source} ({mode} gate)"
        + (f"; calibration: {len(calib_set.pixels)} from the {calib_set.source}" if calib_set is not None else "")
        + (f" (+ {len(select_set.pixels)} held out to score the int8 search)" if select_set is not None else ""))

    tmp_ctx = tempfile.TemporaryDirectory(prefix="clipheads-export-") if workdir is None else None
    work = Path(workdir or tmp_ctx.name)
    try:
        from .optimize import op_counts

        t0 = time.perf_counter()
        plain = {}
        if options.fused_attention and options.target == "onnx" and not options.attention_op:
            log(f"note: the {options.exporter} exporter keeps attention as plain ops (the fused "
                "com.microsoft.MultiHeadAttention node is a TorchScript export symbolic)")
        with fused_attention(plan.backbone) if options.attention_op else contextlib.nullcontext(0):
            for g in plan.graphs:
                plain[g.name] = export_image_graph(g.encoder, work / f"plain_{g.name}", options.opset,
                                                   options.exporter)
                n_mha = _attention_nodes(op_counts(plain[g.name]))  # what the graph holds, not what was asked for
                log(f"exported {g.name} ({g.kind}, {len(g.tasks)} task(s))"
                    + (f", {n_mha} attention blocks as fused attention nodes" if n_mha else ""))
        text_plain = None
        if options.text:
            text_plain = export_text_graph(plan.text, work / "plain_text.onnx", options.opset, options.exporter)
            log("exported text.onnx")
        timings["export_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        gated, shipped, extra, fused_ops, int8 = _optimise(plan, plain, text_plain, options, work, log, calib_set, mode,
                                                             select_set)
        if int8:
            manifest["int8"] = int8
            from .cpu_features import int8_features

            manifest["int8_exported_on"] = int8_features()  # the CPU the int8 gate ran on (cpu_features.py)
        timings["optimise_s"] = time.perf_counter() - t0
        for name, path in shipped.items():
            counts = op_counts(path)
            entry = fused_ops.setdefault(name, {})
            if isinstance(entry, dict):
                entry["attention_nodes"] = _attention_nodes(counts)
                entry["nodes"] = sum(counts.values())
        manifest["fused_ops"] = fused_ops

        t0 = time.perf_counter()
        probes, desc = gate_set.pixels, gate_set.describe()
        gated = dict(gated)
        text_gated = gated.pop("text.onnx", None)
        parity = check_parity(plan, {k: str(v) for k, v in gated.items()}, options.precision,
                              str(text_gated) if text_gated else None, probes, desc, mode=mode)
        timings["parity_s"] = time.perf_counter() - t0
        if options.precision != "fp32":  # the fp32 graphs' own gate, for the record
            parity["fp32_reference_graphs"] = {
                k: v for k, v in check_parity(plan, {k: str(v) for k, v in plain.items()}, "fp32", None, probes,
                                              desc, mode=mode).items() if k in ("passed", "worst", "failures")}
        manifest["parity"] = parity
        log(f"parity ({options.precision}): {'passed' if parity['passed'] else 'FAILED'}"
            + ("" if parity["passed"] else ": " + "; ".join(parity["failures"][:5])))
        manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
        written = None
        if out is not None and (parity["passed"] or allow_parity_failure):
            files = {**shipped, **extra}
            ship_precision = "fp32" if options.target == "tensorrt" else options.precision
            meta = {g.name: {"kind": "image", "precision": ship_precision} for g in plan.graphs}
            meta["text.onnx"] = {"kind": "text", "precision": "fp32" if options.precision == "fp16" else ship_precision}
            meta.update({k: {"kind": "image-fp16" if k != "text.fp16.onnx" else "text-fp16", "precision": "fp16"}
                         for k in extra})
            opsets = [e for e in (_declared_opset(f) for f in files.values()) if e is not None]
            if opsets and max(opsets) != options.opset:
                manifest["opset_requested"] = options.opset
                manifest["opset"] = max(opsets)
                log(f"note: the graphs declare opset {max(opsets)} (requested {options.opset})")
            written = bundle_io.write_bundle(out, manifest, files, meta)
            manifest = bundle_io.load_bundle(written).manifest
            log(f"wrote {written}")
        return ExportResult(parity["passed"], written, manifest, parity, timings)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()


# Ops that stand for several exported nodes (Gemm is left out: the exporter emits it itself).
FUSED_OP_TYPES = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization",
                  "SimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "FusedMatMul",
                  "FusedGemm", "FusedConv", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def _load_time_fusions(src: Path, dst: Path) -> dict:
    """What ONNX Runtime's CPU optimiser (ORT_ENABLE_ALL) makes of `src` when a session loads it:
    fused-op counts for the manifest (the optimised copy is CPU-specific and not shipped)."""
    from .optimize import op_counts, ort_offline

    try:
        counts = op_counts(ort_offline(src, dst))
    except Exception as err:  # noqa: BLE001 - a report, not a requirement
        return {"error": f"{type(err).__name__}: {err}"}
    fused = {k.rsplit(".", 1)[-1]: v for k, v in counts.items() if k.rsplit(".", 1)[-1] in FUSED_OP_TYPES}
    return {"model_type": "onnxruntime CPU load-time (ORT_ENABLE_ALL)", "fused": fused,
            "attention_fused": sum(v for k, v in fused.items() if k.endswith("Attention"))}


def _declared_opset(path) -> Optional[int]:
    from .onnx_export import graph_io

    return graph_io(path).get("opset")


def _attention_nodes(counts: dict) -> int:
    """Fused attention nodes (com.microsoft.MultiHeadAttention, ai.onnx Attention) in `op_counts`."""
    return sum(v for k, v in counts.items() if k.endswith("Attention"))


def _selection_score(mode: str, target: float, row_task_index=None, tasks: Sequence = ()):
    """How the int8 search judges a candidate on the selection images: like the gate (all images
    for a real backbone, the decided half for a random-init one; each task on its own logit
    columns, over the rows fed with its prompt-bank row), by the lower of the measured and the
    expected agreement (`parity.expected_agreement`: 128 images cannot tell 99.8% from 100%); the
    worst task decides. `row_task_index`: the task_index each scored row was run with."""
    suffix = "" if mode == "real" else "_decided_half"

    def one(ref, got) -> float:
        a = agreement(ref, got)
        return min(a["top1_agreement" + suffix], a["expected_agreement" + suffix])

    def score(ref, got):
        if not tasks:
            value = one(ref, got)
        else:  # two tasks of one class list have equal columns: judged together, every margin would be 0
            rows = np.asarray(row_task_index)
            value = min(one(ref[rows == t.task_index, t.logit_slice[0]:t.logit_slice[1]],
                            got[rows == t.task_index, t.logit_slice[0]:t.logit_slice[1]]) for t in tasks)
        return value >= target, value
    return score


def _graph_input(pixels, plan: FoldPlan, options: ExportOptions):
    """uint8 images as the image graph takes them (normalised floats for a float32-input graph)."""
    if options.input_dtype != "float32":
        return pixels
    m = np.asarray(plan.preprocess.mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(plan.preprocess.std, np.float32).reshape(1, 3, 1, 1)
    return ((pixels.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


def _optimise(plan: FoldPlan, plain: dict, text_plain: Optional[Path], options: ExportOptions, work: Path,
              log: Callable[[str], None], calib: Optional[ImageSet] = None,
              mode: str = "real", select: Optional[ImageSet] = None) -> tuple[dict, dict, dict, dict, dict]:
    """-> (graphs to gate, graphs to ship, extra files to ship, fused-op report, int8 report); keys
    are bundle names ("image_0.onnx", "text.onnx")."""
    from .optimize import fuse_transformer, to_fp16, tower_geometry
    from .quantize import image_feeds, quantize_calibrated, quantize_dynamic_int8

    sources = dict(plain)
    if text_plain is not None:
        sources["text.onnx"] = text_plain
    fused_ops: dict = {}
    int8: dict = {}
    current = dict(sources)
    if options.offline_fusions:
        for name, src in sources.items():
            tower = "text" if name == "text.onnx" else "vision"
            if tower == "vision" and not plan.backbone.vision_is_vit:
                fused_ops[name] = {"skipped": f"transformer fusions need a ViT image tower "
                                              f"({type(plan.backbone.model.visual).__name__})"}
                continue
            try:
                heads_, width = tower_geometry(plan.backbone, tower)
                rep = fuse_transformer(src, work / f"fused_{name}", heads_, width,
                                       use_gpu=options.precision == "fp16")
                current[name] = work / f"fused_{name}"
                fused_ops[name] = rep
            except Exception as err:  # noqa: BLE001 - fusion is optional; the plain graph still works
                fused_ops[name] = {"error": f"{type(err).__name__}: {err}"}
        log("fusions: " + ", ".join(f"{k}: {v.get('fused') or v.get('error') or v.get('skipped')}" for k, v in fused_ops.items()))
    if options.precision == "fp16" and options.target == "onnx":
        for name, src in list(current.items()):
            if name != "text.onnx":  # see TEXT_STAYS_FP32
                current[name] = to_fp16(src, work / f"fp16_{name}")
        log("converted image graphs to fp16 (fp32 IO); text graph stays fp32")
    elif options.precision == "fp16":  # tensorrt: fp32 ONNX (TRT 10 FP16 flag) + fp16 ONNX (TRT 11 strong typing)
        fused_ops["note"] = "tensorrt target: fp32 graphs for the TRT 10 FP16 builder flag, *.fp16.onnx for TRT >= 11"
        fp16 = {name: src if name == "text.onnx" else to_fp16(src, work / f"fp16_{name}") for name, src in current.items()}
        extra = {name.replace(".onnx", ".fp16.onnx"): path for name, path in fp16.items() if name != "text.onnx"}
        log("tensorrt fp16: gate runs the fp16 ONNX variants (what a strongly typed TRT 11 build compiles)")
        return fp16, current, extra, fused_ops, int8
    elif options.precision == "int8":
        recipe = options.int8_recipe()
        for name, src in list(current.items()):
            if name == "text.onnx" or options.int8_mode == "dynamic":  # text: label sets are encoded once, cached
                current[name] = quantize_dynamic_int8(src, work / f"int8_{name}", log=log)
                int8[name] = {"mode": "dynamic", "weights": "int8 per output channel",
                              "activations": "uint8 per tensor, ranges at run time"}
                continue
            g = next(g for g in plan.graphs if g.name == name)
            tasks = sorted({t.task_index for t in g.tasks})
            feeds = image_feeds(_graph_input(calib.pixels, plan, options), tasks, recipe.batch)
            select_feeds = image_feeds(_graph_input(select.pixels, plan, options), tasks, recipe.batch) if select else None
            (work / f"q_{name}").mkdir(exist_ok=True)
            scored_rows = np.concatenate([f["task_index"] for f in (select_feeds or feeds)])
            rep = quantize_calibrated(src, work / f"int8_{name}", feeds, recipe,
                                      _selection_score(mode, recipe.target_agreement, scored_rows, g.tasks), log,
                                      work / f"q_{name}", select_feeds)
            rep["calibration"] = calib.describe()
            rep["selection"] = select.describe() if select else "the calibration images (too few to hold any out)"
            int8[name] = rep
            current[name] = work / f"int8_{name}"
        log(f"quantized to int8 ({options.int8_mode})")
    if options.target == "onnx" and not options.offline_fusions:
        for name, path in current.items():
            if name not in fused_ops:  # (skipped towers keep their reason)
                fused_ops[name] = _load_time_fusions(path, work / f"ort_cpu_{name}")
        log("fusions: left to ONNX Runtime at load time; on the CPU: "
            + ", ".join(f"{k}: {v.get('fused') or v.get('error')}" for k, v in fused_ops.items()))
    return current, current, {}, fused_ops, int8
