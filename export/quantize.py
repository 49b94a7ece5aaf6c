"""INT8 for CPU (ECOSYSTEM.md 3.2, issue 17.3).

* `quantize_calibrated` (what `--precision int8` ships): static QDQ, weights int8 per output
  channel, activations uint8 with ranges calibrated on real images (the head's training data or
  the synthetic world, `gate_images.py`), and the MatMuls that lose the most kept in fp32:
    1. MatMuls that see one row per image (the pooled projection, the class matrix: < 0.1% of
       the FLOPs, but their error lands on the logits unfiltered) always stay fp32;
    2. the graph with nothing else fp32 is tried; if it fails, every other MatMul with constant
       weights is ranked by the logit error it causes alone int8 (`int8_sensitivity.py`, one
       switched graph; `Int8Recipe.ranking="local"`: by its own output error, `local_error`);
    3. the most sensitive are kept fp32, 0, 1, 2, 4, ... of them and then the most the cap allows,
       until the quantized graph agrees with fp32 (`Int8Recipe.target_agreement`, judged by the
       caller's `score` on held-out images, `select_feeds`: ranges fit on the scored images never
       clip them) or the kept ones reach `max_keep_flops` of the quantized FLOPs;
    4. only if no such graph passes (`Int8Recipe.activations="auto"`), the same again with each
       token's own activation range taken at run time (`int8_per_row.py`: more accurate, slower
       element-wise work); if nothing passes, the graph tried closest to fp32 (logit RMS) ships.
  A ViT's patch embedding (a Conv whose stride is its kernel: a GEMM over patches) is a candidate
  like the MatMuls (`Int8Recipe.patch_embedding`): fp32 it was 11% of the int8 graph's time on
  ViT-B/32, as QLinearConv 2%. Other Convs (ResNet towers) stay fp32.
  The int8 weights of the MatMuls are rounded by GPTQ (`int8_gptq.py`: each rounding error spread
  over the weights not yet rounded, weighted by the calibration inputs' X^T X) at ORT's per-channel
  scales; `Int8Recipe.weight_rounding="nearest"` rounds each weight alone.
  The report (manifest `int8`) names every kept node with its reason, error and FLOP share.
  Each int8 MatMul is written as ORT's MatMulIntegerToFloat with its bias (`int8_fuse.py`).
* `quantize_dynamic_int8` (`--int8-mode dynamic`): weights int8 per channel, activations quantised
  on the fly (MatMul/Gemm with constant B), clip-as-service's recipe (`reduce_range` keeps u8s8
  VNNI-less CPUs exact-overflow-free).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .int8_candidates import (Candidate, candidates, constant_weights, measure_local_errors, not_candidates,
                              ort_session, probe)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
ACTIVATION_RANGES = ("auto", "per-tensor", "per-row")
WEIGHT_ROUNDINGS = ("gptq", "nearest")
RANKINGS = ("logits", "local")


@dataclass(frozen=True)
class Int8Recipe:
    mode: str = "static"  # static (calibrated QDQ) | dynamic
    calibrate_method: str = "minmax"
    keep: Optional[int] = None  # None: auto (as few as reach target_agreement); k: exactly the k most sensitive
    # on the calibration images, by the caller's score (the pipeline's: the lower of measured and expected
    # agreement, parity.expected_agreement); headroom over the 99.5% target: the gate judges other images
    target_agreement: float = 0.997
    max_keep_flops: float = 0.5  # share of the quantizable FLOPs the auto search may keep in fp32
    keep_pooled: bool = True  # the one-row-per-image MatMuls (projection, class matrix) stay fp32
    batch: int = 16
    smooth_alpha: Optional[float] = None  # SmoothQuant migration strength (smooth.py); None: off
    symmetric_activations: bool = False  # int8 symmetric instead of uint8 asymmetric activations
    reduce_range: bool = False  # 7-bit weights (VNNI-less CPUs' overflow guard)
    percentile: float = 99.999  # the percentile method's range
    patch_embedding: bool = True  # the ViT patch Conv is a candidate too (False: MatMul/Gemm only)
    # per-tensor: calibrated ranges; per-row: each token's own range at run time (int8_per_row.py,
    # slower); auto: per-tensor, and per-row only where per-tensor cannot reach target_agreement
    activations: str = "auto"
    # gptq: int8 weights rounded to keep X @ W on the calibration inputs (int8_gptq.py); nearest: round each alone
    weight_rounding: str = "gptq"
    # logits: the MatMuls ranked by the logit error each causes alone (int8_sensitivity.py, measured
    # only when the all-int8 graph misses the target); local: by their own output error
    ranking: str = "logits"
    sensitivity_images: int = 64  # calibration images of the logit ranking (one pass per candidate)...
    sensitivity_budget_s: float = 120.0  # ...fewer (down to 8) where that many would take longer (ViT-B/16)

    def validate(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"int8 mode must be static or dynamic, got {self.mode!r}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.calibrate_method!r}")
        if self.keep is not None and self.keep < 0:
            raise ValueError("keep must be >= 0")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"int8 weight rounding must be one of {WEIGHT_ROUNDINGS}, got {self.weight_rounding!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"int8 ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.sensitivity_images < 1 or self.sensitivity_budget_s <= 0:
            raise ValueError("sensitivity_images must be >= 1 and sensitivity_budget_s > 0")
        if self.activations not in ACTIVATION_RANGES:
            raise ValueError(f"int8 activations must be one of {ACTIVATION_RANGES}, got {self.activations!r}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth alpha must be in [0, 1], got {self.smooth_alpha}")


class _RootToLog(logging.Filter):
    """Hands root-logger records to `log` and drops them."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__()
        self._log = log

    def filter(self, record: logging.LogRecord) -> bool:
        self._log(f"onnxruntime: {record.getMessage().strip()}")
        return False


@contextlib.contextmanager
def ort_logs_to(log: Callable[[str], None]):
    """onnxruntime.quantization logs on the root logger (`logging.warning("Please consider to run
    pre-processing ...")`), whose stderr handler (`logging.basicConfig`, installed by the first such
    call, or by open_clip's) prints past --quiet. While quantizing, those records go to `log` (a no-op
    under --quiet) instead; other loggers' records are untouched (a logger's filters see only its own)."""
    root = logging.getLogger()
    routed = _RootToLog(log)
    root.addFilter(routed)
    try:
        yield
    finally:
        root.removeFilter(routed)


def quantize_dynamic_int8(src: str | Path, dst: str | Path, per_channel: bool = True, reduce_range: bool = True,
                          log: Callable[[str], None] = lambda m: None) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with ort_logs_to(log):
        quantize_dynamic(  # DefaultTensorType: shape inference cannot type outputs of contrib ops (fused graphs)
            str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            # fp32 out of every quantized MatMul: ORT runs Q + MatMulIntegerToFloat, no requantize/dequantize pass
            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                           "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return Path(dst)


# ---- the calibrated recipe ------------------------------------------------------------------
class FeedReader:
    """onnxruntime CalibrationDataReader over a list of feeds (re-iterable: histogram methods)."""

    def __init__(self, feeds: Sequence[dict]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> Optional[dict]:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def image_feeds(pixels: np.ndarray, task_indices: Sequence[int], batch: int = 16) -> list[dict]:
    """{pixels, task_index} batches: every image once per prompt-bank row of the graph."""
    return [{"pixels": pixels[i:i + batch], "task_index": np.full(len(pixels[i:i + batch]), k, np.int64)}
            for k in task_indices for i in range(0, len(pixels), batch)]


def smoothed(model, cands: list[Candidate], feeds: Sequence[dict], cfg, work: Path, skip: set[str]):
    """`model` with SmoothQuant scale migration on every candidate not in `skip` (smooth.py) ->
    (saved path, model, report)."""
    import onnx

    from .smooth import smooth_model

    groups: dict[str, list[str]] = {}
    for c in cands:
        if c.node not in skip and c.kind != "Conv":  # MatMul/Gemm only: the patch Conv's input is the image
            groups.setdefault(c.activation, []).append(c.node)
    _, _, amax, _, _ = probe(model, list(groups), feeds, work, keep_batches=0)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = smooth_model(out, groups, amax, cfg)
    path = work / "smoothed.onnx"
    onnx.save(out, str(path))
    return path, out, report


def _static(src: Path, dst: Path, reader: Optional[FeedReader], exclude: Sequence[str], recipe: Int8Recipe,
            cache: Path, op_types: Sequence[str] = ("MatMul", "Gemm"),
            log: Callable[[str], None] = lambda m: None) -> Path:
    """ORT's static QDQ quantizer with the recipe's options."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = recipe.calibrate_method
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    with ort_logs_to(log):
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType.QInt8 if recipe.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
            nodes_to_exclude=list(exclude), calibrate_method=calib, calibration_cache_path=str(cache),
            # fp32 out of every quantized MatMul: ORT runs Q + MatMulIntegerToFloat, no requantize/dequantize pass
            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                           "ActivationSymmetric": recipe.symmetric_activations,
                           **({"CalibPercentile": recipe.percentile} if method == "percentile" else {})},
        )
    return dst


def _round_gptq(static: Path, weights: dict, grams: dict, cache: dict) -> int:
    import onnx

    from .int8_gptq import round_weights

    model = onnx.load(str(static))
    done = round_weights(model, weights, grams, cache)
    onnx.save(model, str(static))
    return done


def _shipped(static: Path, dst: Path, activations: str) -> Path:
    """The static QDQ graph as it ships: int8 MatMuls fused with their bias (int8_fuse.py, bit-identical,
    11% faster on ViT-B/32), with per-row activation ranges if asked (int8_per_row.py)."""
    import onnx

    from .int8_fuse import fuse_int8_matmuls
    from .int8_per_row import per_row_activations

    model = onnx.load(str(static))
    fuse_int8_matmuls(model)
    if activations == "per-row":
        per_row_activations(model)
    onnx.save(model, str(dst))
    return dst


def _preprocessed(src: Path, work: Path, log: Callable[[str], None] = lambda m: None) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    try:
        with ort_logs_to(log):
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        return pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        return Path(src)


Score = Callable[[np.ndarray, np.ndarray], tuple[bool, float]]


def top1_score(target: float) -> Score:
    """The lower of measured and expected top-1 agreement (`parity.expected_agreement`)."""
    from .parity import expected_agreement

    def score(ref: np.ndarray, got: np.ndarray) -> tuple[bool, float]:
        a = min(float((ref.argmax(1) == got.argmax(1)).mean()), expected_agreement(ref, got))
        return a >= target, a
    return score


def quantize_calibrated(src: str | Path, dst: str | Path, calib_feeds: Sequence[dict], recipe: Int8Recipe = Int8Recipe(),
                        score: Optional[Score] = None, log: Callable[[str], None] = lambda m: None,
                        workdir: Optional[Path] = None, select_feeds: Optional[Sequence[dict]] = None) -> dict:
    """Static int8 of `src` (an image graph with a `logits` output) -> `dst`; returns the report.
    `calib_feeds` fit the ranges and GPTQ; the search scores its graphs on `select_feeds`, images
    the ranges were not fit on (a range fit on the scored images never clips them, so it scores
    better than it serves); None: on the calibration images."""
    import onnx

    recipe.validate()
    score = score or top1_score(recipe.target_agreement)
    src, dst = Path(src), Path(dst)
    tmp = tempfile.TemporaryDirectory(prefix="clipheads-int8-") if workdir is None else None
    work = Path(workdir or tmp.name)
    try:
        pre = _preprocessed(src, work, log)
        model = onnx.load(str(pre))
        gptq = recipe.weight_rounding == "gptq"
        cands = candidates(model, recipe.patch_embedding)
        measure_local_errors(pre, model, cands, calib_feeds, work, grams=gptq and recipe.smooth_alpha is None)
        smooth_report = None
        if recipe.smooth_alpha is not None:  # migrate, then rank the migrated graph's MatMuls
            from .smooth import SmoothConfig

            one_row = {c.node for c in cands if c.rows_per_image <= 1.0 + 1e-9}
            pre, model, smooth_report = smoothed(model, cands, calib_feeds, SmoothConfig(recipe.smooth_alpha),
                                                 work, one_row)
            cands = candidates(model, recipe.patch_embedding)
            measure_local_errors(pre, model, cands, calib_feeds, work, grams=gptq)  # the migrated graph's inputs
        total = sum(c.flops_per_image for c in cands) or 1.0
        pooled = [c for c in cands if c.rows_per_image <= 1.0 + 1e-9] if recipe.keep_pooled else []
        rest = [c for c in cands if c not in pooled]
        fp32 = ort_session(pre)
        held_out = bool(select_feeds)
        select_feeds = list(select_feeds) if held_out else list(calib_feeds)
        ref = np.concatenate([fp32.run(["logits"], f)[0] for f in select_feeds])
        # ORT's calibration cache: shared by this call's graphs (one model, one reader, one method), never
        # by another call's (a reused workdir would ship the previous export's ranges, or ORT refuses
        # another --calibration-method outright): a fresh file per call, removed when done
        cache = work / "calibration.json"
        cache.unlink(missing_ok=True)
        # with a patch Conv among the candidates ORT quantizes Convs: every other Conv is excluded
        patch = {c.node for c in cands if c.kind == "Conv"}
        op_types = ("MatMul", "Gemm", "Conv") if patch else ("MatMul", "Gemm")
        never_int8 = not_candidates(model, cands)
        reader = FeedReader(calib_feeds)
        rounding = None  # GPTQ's inputs, once: every graph of the search reuses them (and its results)
        if gptq:
            weights = {c.node: constant_weights(model, c.weight) for c in rest if c.input_gram is not None}
            rounding = {"weights": {k: w for k, w in weights.items() if w.ndim == 2},
                        "grams": {c.node: c.input_gram for c in rest if c.input_gram is not None}, "cache": {}}

        def keep_counts(ranked: list[Candidate]) -> list[int]:
            if recipe.keep is not None:
                return [min(recipe.keep, len(ranked))]
            # 0, 1, 2, 4, ... and the most the FLOP cap allows (the shares only grow with k)
            shares = np.cumsum([0.0] + [c.flops_per_image for c in ranked]) / total
            most = int(np.searchsorted(shares, recipe.max_keep_flops, side="right")) - 1
            return sorted({0, most} | {2 ** i for i in range(most.bit_length()) if 2 ** i <= most})

        ranges = ["per-tensor", "per-row"] if recipe.activations == "auto" else [recipe.activations]
        sensitivity: dict = {}  # the logit ranking's inputs, built once: its images, their fp32 logits, int8 weights

        def ranked_for(act: str) -> list[Candidate]:
            """The candidates, most sensitive first: by their logit error (measured once per mode)."""
            from .int8_sensitivity import int8_weights, logit_sensitivity, ranking_feeds

            if recipe.ranking == "logits" and rest and act not in rest[0].logit_error:
                if not sensitivity:
                    feeds = ranking_feeds(fp32, calib_feeds, len(rest), recipe.sensitivity_images,
                                          recipe.sensitivity_budget_s)
                    sensitivity.update(feeds=feeds, ref=np.concatenate([fp32.run(["logits"], f)[0] for f in feeds]),
                                       weights=int8_weights(model, rest, rounding))
                errs = logit_sensitivity(model, rest, sensitivity["feeds"], sensitivity["ref"], act,
                                         {c.activation: c.activation_range for c in rest}, sensitivity["weights"], work)
                for c, e in zip(rest, errs):
                    c.logit_error[act] = e
                log(f"int8 ranking ({act} activations): logit error of each of {len(rest)} candidates alone int8, "
                    f"on {len(sensitivity['ref'])} images; worst: "
                    + ", ".join(f"{c.node} {c.logit_error[act]:.4f}" for c in sorted(rest, key=lambda c: -c.error(act))[:3]))
            return sorted(rest, key=lambda c: -c.error(act))

        tried, chosen, built = [], None, {}

        def attempt(act: str, ranked: list[Candidate], k: int) -> bool:
            """Build (once per keep set), score and record the graph with the k most sensitive kept fp32."""
            nonlocal chosen
            keep = pooled + ranked[:k]
            key = frozenset(c.node for c in keep)
            static = built.get(key)
            if static is None:  # one static graph per keep set, shared by both activation ranges
                reader.rewind()
                static = built[key] = _static(pre, work / f"int8_keep{len(built)}.onnx", reader,
                                              [c.node for c in keep] + never_int8, recipe, cache, op_types, log)
                if rounding:
                    _round_gptq(static, **rounding)
            out = static if act == "per-tensor" else _shipped(static, static.with_suffix(".per_row.onnx"), act)
            sess = ort_session(out)
            got = np.concatenate([sess.run(["logits"], f)[0] for f in select_feeds])
            ok, value = score(ref, got)
            rms = float(np.sqrt(np.mean((got - ref) ** 2)))
            share = sum(c.flops_per_image for c in keep) / total
            tried.append({"kept_sensitive": k, "activations": act, "calibration_score": value,
                          "logit_rms_error": rms, "kept_flops_share": share, "passed": ok})
            log(f"int8 static ({recipe.calibrate_method}, {act} activations): {k} sensitive MatMul(s) + "
                f"{len(pooled)} pooled in fp32 ({share:.1%} of the FLOPs): score {value:.4f}, logit RMS error "
                f"{rms:.4f} on {len(ref)} {'held-out' if held_out else 'calibration'} images")
            # none passing: the one closest to fp32. Not the best score: on a few hundred images that
            # counts one or two flips, and it can favour a per-tensor graph whose ranges fit those very
            # images and clip others (bench/export/int8_world.md)
            if chosen is None or ok or rms < chosen[3]:
                chosen = (keep, out, share, rms, act)
            return ok

        for act in ranges:  # per-row only when no per-tensor graph passed: it costs element-wise passes
            # ranked by the error under this range: per row, the MatMuls lose far less and the patch
            # Conv (per tensor either way) comes first. Keeping none needs no ranking: it goes first,
            # and the ranking is measured only if it fails
            if (recipe.keep in (None, 0) or not rest) and attempt(act, rest, 0):
                break
            if recipe.keep == 0 or not rest:
                continue
            ranked = ranked_for(act)
            if any(attempt(act, ranked, k) for k in keep_counts(ranked) if k):
                break
        keep, out, share, _, act = chosen
        ranked_mode = any(t["kept_sensitive"] for t in tried if t["activations"] == act)
        if act == "per-tensor":
            _shipped(out, dst, act)  # fused only now: bit-identical, so the search scored the unfused graph
        else:
            shutil.copyfile(out, dst)  # scored as it ships
        n_images = sum(len(f["pixels"]) for f in calib_feeds)
        return {
            "mode": "static", "format": "QDQ, int8 MatMuls as MatMulIntegerToFloat with their bias (int8_fuse.py)",
            "weights": "int8 per output channel (symmetric), " + (
                "GPTQ rounding on the calibration inputs (int8_gptq.py)" if rounding else "rounded to nearest"),
            "activations": (f"uint8 per tensor, {recipe.calibrate_method} calibration" if act == "per-tensor" else
                            "uint8 per row (token), range at run time (int8_per_row.py)"),
            "activation_ranges": act,
            "ranking": (("logit error alone int8" if rest and act in rest[0].logit_error else "local error")
                        if ranked_mode else "none needed (nothing kept fp32 but the pooled MatMuls)"),
            "recipe": asdict(recipe), "calibration_feeds": len(calib_feeds), "calibration_rows": n_images,
            # the rows the logit ranking ran on: recipe.sensitivity_images or fewer (its time budget,
            # int8_sensitivity.ranking_feeds); 0: no ranking measured
            "sensitivity_images_used": len(sensitivity["ref"]) if sensitivity else 0,
            "selection_rows": sum(len(f["pixels"]) for f in select_feeds) if held_out else 0,  # 0: the calibration images
            "quantized_nodes": len(cands) - len(keep), "candidate_nodes": len(cands),
            "kept_fp32": [{"node": c.node, "reason": "pooled: one row per image" if c in pooled else "sensitive",
                           **c.errors(act), "flops_share": round(c.flops_per_image / total, 6)} for c in keep],
            "kept_flops_share": round(share, 6),
            "search": tried,
            "most_sensitive": [{"node": c.node, **c.errors(act)} for c in sorted(rest, key=lambda c: -c.error(act))[:8]],
            **({"smooth": {"alpha": recipe.smooth_alpha, "activations": smooth_report}} if smooth_report else {}),
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
        else:
            (work / "calibration.json").unlink(missing_ok=True)


def quantize_static_qdq(src: str | Path, dst: str | Path, calib_pixels: np.ndarray, task_indices: list[int],
                        per_channel: bool = True) -> Path:
    """Static QDQ of every MatMul/Gemm (nothing kept in fp32), MinMax on `calib_pixels` (benchmarks)."""
    quantize_calibrated(src, dst, image_feeds(calib_pixels, task_indices), Int8Recipe(keep=0))
    return Path(dst)
