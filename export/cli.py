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

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--int8-mode", default="dynamic", choices=("dynamic", "static"))
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="onnxruntime.transformers offline fusions (default: for fp16 only; fp32/int8 graphs "
                        "are left to ORT's load-time CPU fusions, which ran faster there)")
    p.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="vision attention as one com.microsoft.MultiHeadAttention node (default; faster at batch "
                        ">= 16, slower at batch 1 on the CPU: --no-fused-attention for single-image latency)")
    p.add_argument("--no-text", action="store_true", help="no text graph (no request-time labels)")
    p.add_argument("--pretrained", "--backbone-weights", dest="backbone_weights", default=None, metavar="WEIGHTS",
                   help="where the heads' backbone weights are now (path, tag or hf-hub id) if not where they were "
                        "trained; checked against the recorded sha256")
    p.add_argument("--probes", type=int, default=24, help="probe images for the parity gate")
    p.add_argument("--allow-parity-failure", action="store_true", help="write the bundle even if the gate fails")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return p


def _engine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipheads export build-engine",
                                description="Build TensorRT engines for a bundle on this machine (the edge device).")
    p.add_argument("bundle")
    p.add_argument("--workspace-gb", type=float, default=2.0)
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: BUNDLE/trt.timing.cache)")
    p.add_argument("--precision", default=None, choices=("fp32", "fp16"), help="default: the bundle's precision")
    p.add_argument("--force", action="store_true", help="rebuild even if a compatible engine exists")
    p.add_argument("--json", action="store_true")
    return p


def _say(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def _register_extra_model_configs() -> None:
    """`CLIPHEADS_MODEL_CONFIGS=DIR[:DIR]`: extra open_clip architecture JSONs (as serving/ reads them)."""
    import os
    from pathlib import Path

    extra = os.environ.get("CLIPHEADS_MODEL_CONFIGS")
    if extra:
        import open_clip

        for d in extra.split(os.pathsep):
            if d and Path(d).is_dir():
                open_clip.add_model_config(d)


def load_heads(paths: Sequence[str], backbone_weights: Optional[str] = None, log=None):
    """Read head files and build them on one shared backbone -> (heads, heads_meta, preprocess).
    `backbone_weights`: where the weights are now (sha256-checked against the heads' record)."""
    from clipheads.training.artifact import load_head
    from clipheads.training.backbone_record import record_differences

    from .fold import FoldError

    _register_extra_model_configs()
    arts = [load_head(p) for p in paths]
    first = arts[0]
    for p, a in zip(paths[1:], arts[1:]):
        diffs = record_differences(first.backbone, a.backbone)
        if diffs:
            raise FoldError(f"{p}: backbone differs from {paths[0]}'s ({'; '.join(diffs)}); "
                            "one bundle holds heads of one backbone")
        if a.preprocess != first.preprocess:
            raise FoldError(f"{p}: preprocessing differs from {paths[0]}'s")
    from clipheads.training.methods import get_method

    for p, a in zip(paths, arts):  # refuse before paying for the backbone
        cls = get_method(a.method)
        if not cls.foldable:
            raise FoldError(f"{p}: method {a.method!r} is not foldable into [image graph + constant class matrix]"
                            f" ({cls.summary}); serve the head file with the PyTorch runtime instead")
    backbone = first.open_backbone(backbone_weights, log=log)
    heads = [a.build(backbone) for a in arts]
    meta = [{"file": str(p), "method": a.method, "config": a.method_config, "tasks": [t.name for t in a.tasks],
             "training": {k: a.training[k] for k in ("data", "shots", "seed", "metrics") if k in a.training}}
            for p, a in zip(paths, arts)]
    return heads, meta, first.preprocess


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":  # tolerate being handed the subcommand name
        argv = argv[1:]
    if argv and argv[0] == "build-engine":
        return _build_engine(argv[1:])
    args = _parser().parse_args(argv)

    from clipheads.training.artifact import ArtifactError
    from clipheads.training.backbone import BackboneError
    from clipheads.training.methods.base import MethodError

    from .fold import FoldError
    from .pipeline import ExportOptions, ExportUsageError, export_heads

    options = ExportOptions(
        target=args.target, precision=args.precision, max_batch=args.max_batch, input_dtype=args.input_dtype,
        opset=args.opset, exporter=args.exporter, fuse=args.fuse, fused_attention=args.fused_attention,
        int8_mode=args.int8_mode,
        text=not args.no_text, probes=args.probes,
    )
    try:
        options.validate()
        _say(f"loading {len(args.heads)} head(s)")
        heads, meta, preprocess = load_heads(args.heads, args.backbone_weights, log=_say)
        result = export_heads(heads, args.out, options, meta, preprocess, args.allow_parity_failure, log=_say)
    except (ExportUsageError, FoldError, ArtifactError, BackboneError, MethodError) as err:
        _say(f"error: {err}")
        if args.json:
            print(json.dumps({"ok": False, "exit_code": EXIT_USAGE, "error": str(err)}))
        return EXIT_USAGE
    code = EXIT_OK if result.passed else EXIT_FAIL
    if args.json:
        print(json.dumps({"ok": result.passed, "exit_code": code, "bundle": str(result.bundle) if result.bundle else None,
                          "precision": options.precision, "target": options.target,
                          "parity": {k: result.parity.get(k) for k in ("passed", "failures", "worst", "mixed_batch", "text")},
                          "fused_ops": result.manifest.get("fused_ops"), "timings": result.timings}))
    else:
        print(result.summary())
    if not result.passed and result.bundle is None:
        _say("parity gate failed: no bundle written (use --allow-parity-failure to write it anyway)")
    return code


def _build_engine(argv: Sequence[str]) -> int:
    args = _engine_parser().parse_args(argv)
    from .bundle import BundleError
    from .tensorrt import TensorRTUnavailable, build_bundle_engines

    try:
        report = build_bundle_engines(args.bundle, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                                      precision=args.precision, force=args.force, log=_say)
    except (BundleError, TensorRTUnavailable, ValueError) as err:
        _say(f"error: {err}")
        if args.json:
            print(json.dumps({"ok": False, "exit_code": EXIT_USAGE, "error": str(err)}))
        return EXIT_USAGE
    except RuntimeError as err:  # the build itself failed
        _say(f"engine build failed: {err}")
        if args.json:
            print(json.dumps({"ok": False, "exit_code": EXIT_FAIL, "error": str(err)}))
        return EXIT_FAIL
    if args.json:
        print(json.dumps({"ok": True, "exit_code": EXIT_OK, **report}))
    else:
        print(f"engines: " + ", ".join(f"{k} ({v['status']})" for k, v in report["engines"].items()))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
