"""`clipheads export ...`: a thin argparse layer over `export.pipeline` and `export.tensorrt`.

    clipheads export HEAD [HEAD...] --out BUNDLE [--target onnx|tensorrt] [--precision fp32|fp16|int8]
                     [--max-batch N] [--input-dtype uint8|float32] [--allow-parity-failure] [--json]
    clipheads export build-engine BUNDLE [--workspace-gb G] [--timing-cache FILE] [--force] [--json]

Exit codes: 0 ok, 1 parity gate failed (no bundle written unless --allow-parity-failure) or
engine build failed, 2 bad input (unreadable head, non-foldable method, mixed backbones, bad options).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from clipheads.training import console

EXIT_OK, EXIT_FAIL, EXIT_USAGE = console.EXIT_OK, console.EXIT_FAIL, console.EXIT_BAD_INPUT


def _parser() -> console.ArgumentParser:
    p = console.ArgumentParser(
        prog="clipheads export", description="Fold trained heads into a parity-gated bundle.",
        epilog="Also: clipheads export build-engine BUNDLE (TensorRT engines, run on the target GPU). "
               "Exit codes: 0 ok, 1 parity gate failed, 2 bad input. Extra open_clip configs: "
               "CLIPHEADS_MODEL_CONFIGS=DIR[:DIR].")
    p.add_argument("heads", nargs="+", metavar="HEAD", help="head files (NAME.head.safetensors) on one backbone")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    p.add_argument("--target", default="onnx", choices=("onnx", "tensorrt"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--input-dtype", default="uint8", choices=("uint8", "float32"),
                   help="uint8: resized/cropped pixels, normalised in the graph (default); float32: normalised input")
    p.add_argument("--int8-mode", default="static", choices=("static", "dynamic"),
                   help="static (default): calibrated QDQ, per-channel weights, the most sensitive MatMuls kept "
                        "fp32 (manifest int8.kept_fp32); dynamic: activations quantized at run time")
    p.add_argument("--calibration-images", type=int, default=128,
                   help="static int8: calibration images (the heads' training data, else the synthetic world)")
    p.add_argument("--selection-images", type=int, default=128,
                   help="static int8: more images from the same source, held out of calibration, that the "
                        "search scores its candidate graphs on (0: score on the calibration images)")
    p.add_argument("--calibration-method", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--int8-keep", type=int, default=None, metavar="K",
                   help="static int8: keep exactly the K most sensitive MatMuls in fp32 (default: as few as "
                        "reach 99.7%% top-1 agreement with fp32 on the held-out selection images, "
                        "--selection-images)")
    p.add_argument("--int8-activations", default="auto", choices=("auto", "per-tensor", "per-row"),
                   help="static int8 activation ranges: per-tensor (calibrated, fastest), per-row (each token's "
                        "range at run time: closer to fp32, slower); auto (default): per-row only if per-tensor "
                        "cannot reach the agreement target")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset: 14..23 (torchscript exporter), 14..25 (dynamo)")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="onnxruntime.transformers offline fusions (default: for fp16 only; fp32/int8 graphs "
                        "are left to ORT's load-time CPU fusions, which ran faster there)")
    p.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="vision attention as one com.microsoft.MultiHeadAttention node (default; as fast as or "
                        "faster than the plain graph at batch 1 and 16 on the CPU); --no-fused-attention emits "
                        "plain opset-17 attention")
    p.add_argument("--no-text", action="store_true", help="no text graph (no request-time labels)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="rename a task in the bundle (repeatable); HEAD:OLD=NEW when several heads have task OLD "
                        "(HEAD: 1-based position or file name); all apply at once, so two tasks can swap names")
    p.add_argument("--pretrained", "--backbone-weights", dest="backbone_weights", default=None, metavar="WEIGHTS",
                   help="where the heads' backbone weights are now (path, tag or hf-hub id) if not where they were "
                        "trained; checked against the recorded sha256")
    p.add_argument("--probes", "--gate-images", dest="probes", type=int, default=256,
                   help="real images the parity gate judges on (default 256)")
    p.add_argument("--image-source", default="auto", choices=("auto", "world"),
                   help="gate and calibration images: auto = the heads' training/validation images when their "
                        "data is on disk, else the synthetic world; world = always the world")
    p.add_argument("--gate", default="auto", choices=("auto", "real", "random-init"),
                   help="auto: random-init (decided-half agreement + feature cosine) for backbones without "
                        "pretrained weights, else real (top-1 agreement on every gate image)")
    p.add_argument("--allow-parity-failure", action="store_true", help="write the bundle even if the gate fails")
    console.add_output_flags(p)
    return p


def _engine_parser() -> console.ArgumentParser:
    p = console.ArgumentParser(prog="clipheads export build-engine",
                               description="Build TensorRT engines for a bundle on this machine (the edge device).")
    p.add_argument("bundle", help="bundle directory written by `clipheads export --target tensorrt`")
    p.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace in GiB")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: BUNDLE/trt-<gpu>-sm<cc>-trt<version>.timing.cache, one per device)")
    p.add_argument("--precision", default=None, choices=("fp32", "fp16"), help="default: the bundle's precision")
    p.add_argument("--force", action="store_true", help="rebuild even if a compatible engine exists")
    console.add_output_flags(p)
    return p


def _logger(quiet: bool):
    return lambda msg: console.info(f"[export] {msg}", quiet)


def _bad_input() -> tuple[type[BaseException], ...]:
    from clipheads.training.artifact import ArtifactError
    from clipheads.training.backbone import BackboneError
    from clipheads.training.methods.base import MethodError

    from .bundle import BundleError
    from .fold import FoldError
    from .pipeline import ExportUsageError

    return ExportUsageError, FoldError, ArtifactError, BackboneError, MethodError, BundleError


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":  # tolerate being handed the subcommand name
        argv = argv[1:]
    if argv and argv[0] == "build-engine":
        return _build_engine(argv[1:])
    args, code = console.parse(_parser(), argv)
    if args is None:
        return code
    return console.run("clipheads export", lambda: _export(args), _bad_input(), as_json=args.json)


def _export(args) -> int:
    from .heads import export_bundle, parse_renames
    from .pipeline import ExportOptions

    options = ExportOptions(
        target=args.target, precision=args.precision, max_batch=args.max_batch, input_dtype=args.input_dtype,
        opset=args.opset, exporter=args.exporter, fuse=args.fuse, fused_attention=args.fused_attention,
        int8_mode=args.int8_mode, calibration_images=args.calibration_images,
        selection_images=args.selection_images,
        calibration_method=args.calibration_method, int8_keep=args.int8_keep,
        int8_activations=args.int8_activations,
        text=not args.no_text, probes=args.probes, image_source=args.image_source, gate=args.gate,
    )
    say = _logger(args.quiet)
    say(f"loading {len(args.heads)} head(s)")
    result = export_bundle(args.heads, args.out, options, backbone_weights=args.backbone_weights,
                           rename=parse_renames(args.rename), allow_parity_failure=args.allow_parity_failure, log=say)
    code = EXIT_OK if result.passed else EXIT_FAIL
    console.emit({"ok": result.passed, "exit_code": code, "bundle": str(result.bundle) if result.bundle else None,
                  "precision": options.precision, "target": options.target,
                  "tasks": [t["name"] for t in result.manifest.get("tasks", [])],
                  "parity": {k: result.parity.get(k) for k in ("passed", "failures", "worst", "mixed_batch", "text")},
                  "fused_ops": result.manifest.get("fused_ops"), "timings": result.timings},
                 args.json, result.summary())
    if not result.passed and result.bundle is None:
        console.info("[export] parity gate failed: no bundle written (use --allow-parity-failure to write it anyway)")
    return code


def _build_engine(argv: Sequence[str]) -> int:
    args, code = console.parse(_engine_parser(), argv)
    if args is None:
        return code
    from .bundle import BundleError
    from .tensorrt import TensorRTUnavailable

    def run() -> int:
        from .tensorrt import build_bundle_engines

        try:
            report = build_bundle_engines(args.bundle, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                                          precision=args.precision, force=args.force,
                                          log=_logger(args.quiet))
        except (BundleError, TensorRTUnavailable, ValueError):
            raise
        except RuntimeError as err:  # the build itself failed
            console.info(f"clipheads export build-engine: engine build failed: {err}")
            if args.json:
                print(json.dumps({"ok": False, "exit_code": EXIT_FAIL, "error": str(err)}))
            return EXIT_FAIL
        console.emit({"ok": True, "exit_code": EXIT_OK, **report}, args.json,
                     "engines: " + ", ".join(f"{k} ({v['status']})" for k, v in report["engines"].items()))
        return EXIT_OK

    return console.run("clipheads export build-engine", run, (BundleError, TensorRTUnavailable, ValueError),
                       as_json=args.json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
