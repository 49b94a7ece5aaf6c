"""clipheads export: fold trained heads into a parity-gated ONNX / TensorRT bundle.

    fold.py         heads -> FoldPlan (image graphs as torch modules with constant class matrices,
                    prompt banks gathered by task_index, shared plain path; plain text tower)
    onnx_export.py  torch.onnx.export (TorchScript exporter, opset 17, dynamic batch) + onnx.checker
    optimize.py     ORT transformer fusions, offline ORT optimisation, fp16 with fp32 IO
    quantize.py     int8: dynamic per-channel, and the calibrated static recipe (its search)
    int8_*.py       the static recipe's parts: candidates and their errors, logit sensitivity,
                    GPTQ rounding, bias fusion, per-row activations
    parity.py       eager PyTorch vs ONNX Runtime on fixed probes; the gate that can fail
    bundle.py       manifest.json + files: atomic write, validated read (see BUNDLE.md)
    pipeline.py     export_heads(): the whole run as one library call
    heads.py        export_bundle(): head files (or heads) + task renames -> pipeline (CLI and Python API)
    tensorrt.py     engines built on the target, tagged, engine_compatible()
    cli.py          `clipheads export ...` (main(argv))
"""
