"""A stand-in export bundle for benchmarks, until `clipheads export` (export/) lands.

    python bench/serving/contract_bundle.py HEAD.head.safetensors OUT_DIR

Writes the bundle contract that `clipheads.serving.runtimes.OnnxRuntime` reads (DESIGN.md "Export bundle"):
`manifest.json` + `image_0.onnx` taking uint8 pixels (N, 3, S, S) and returning `logits`
(N, sum C) and L2-normalised `features` (N, E) -- the head's image path with normalisation and the
class-embedding matrix folded in. No text graph (request-time labels are not benchmarked), no
parity gate beyond the max |logit difference| printed and stored here. Only for foldable heads
whose tasks share one image path (zero-shot, CoOp-style text prompts).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def build(head: str, out: Path) -> Path:
    import torch

    from clipheads.serving.runtimes import TorchRuntime, register_extra_model_configs

    register_extra_model_configs()
    rt = TorchRuntime(head, device="cpu")
    if len([p for p in rt.paths if p != "backbone"]) != 1 or rt._class_w.keys() != set(range(len(rt.tasks))):
        raise SystemExit("contract_bundle: only single-path foldable heads (zero-shot, CoOp-like) are supported")

    class ImageGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = rt.head
            self.register_buffer("mean", rt._mean.clone())
            self.register_buffer("std", rt._std.clone())
            self.register_buffer("w", torch.cat([rt._class_w[i] for i in range(len(rt.tasks))]).float())
            self.scale = float(rt.logit_scale)

        def forward(self, pixels):
            x = (pixels.float() / 255.0 - self.mean) / self.std
            f = self.head.image_features(x, 0).float()
            return self.scale * f @ self.w.t(), f

    s = int(rt.preprocess["image_size"])
    out.mkdir(parents=True, exist_ok=True)
    graph = out / "image_0.onnx"
    probe = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, s, s), dtype=np.uint8))
    t0 = time.time()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
    with torch.no_grad():
        torch.onnx.export(ImageGraph().eval(), (probe,), str(graph), input_names=["pixels"],
                          output_names=["logits", "features"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}})
    export_s = time.time() - t0
    tasks, start = [], 0
    for t in rt.tasks.values():
        n = len(t.classnames)
        tasks.append({"name": t.name, "classnames": list(t.classnames), "graph": graph.name, "task_index": 0,
                      "logit_slice": [start, start + n], "templates": list(t.templates)})
        start += n
    arch, pretrained, sha = rt.identity.split(":", 2)
    manifest = {
        "format": "clipheads-bundle", "format_version": 1,
        "note": "stand-in written by bench/serving/contract_bundle.py (not clipheads export)",
        "backbone": {"arch": arch, "pretrained": pretrained, "weights_sha256": sha},
        "preprocess": dict(rt.preprocess, input_dtype="uint8"), "logit_scale": rt.logit_scale,
        "tasks": tasks, "graphs": {graph.name: {"sha256": hashlib.sha256(graph.read_bytes()).hexdigest()}},
        "text": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))

    from clipheads.serving.runtimes import OnnxRuntime

    ort_rt = OnnxRuntime(out, providers=["CPUExecutionProvider"])
    px = probe.numpy()
    a, b = rt.run_path(0, px)[0], ort_rt.run_path(0, px)[0]
    diff = float(np.abs(a - b).max())
    manifest["parity"] = {"max_abs_logit_diff": diff, "probe": "4 random uint8 images"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"bundle {out}: export {export_s:.0f} s, max |logit diff| vs eager {diff:.2e}", file=sys.stderr)
    return out


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
