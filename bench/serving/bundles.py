"""The two bundles the serving benchmarks use, written with the real `clipheads export`.

    python bench/serving/bundles.py OUT_DIR [--arch clipheads-tiny ViT-B-32]

* `clipheads-tiny`: a zero-shot head (tasks color/shape) on the packaged tiny CLIP (48 px, its
  packaged weights), exported fp32 -> OUT_DIR/tiny-bundle
* `ViT-B-32`: the same head on ViT-B/32 with random weights (speed only; the labels mean
  nothing), exported fp32 -> OUT_DIR/vitb32-bundle
Existing bundles are kept (delete them to rebuild).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = {"clipheads-tiny": "tiny", "ViT-B-32": "vitb32"}
TASKS = (("color", ("red", "green", "blue")), ("shape", ("circle", "square", "triangle", "star")))


def make_head(arch: str, out: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipheads.training.artifact import save_head
    from clipheads.training.backbone import PACKAGED_ARCH, load_backbone
    from clipheads.training.methods.base import TaskSpec, build_method

    if arch == PACKAGED_ARCH:
        bb = load_backbone(arch)  # the packaged weights
    else:
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        ckpt = out / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        bb = load_backbone(arch, str(ckpt), act="gelu")  # open_clip built it with GELU
    tasks = [TaskSpec(n, labels) for n, labels in TASKS]
    return save_head(build_method("zeroshot", bb, tasks, {}), out / f"{NAMES[arch]}.head.safetensors")


def make_bundle(arch: str, out: Path) -> Path:
    from clipheads.export.cli import main as export_main

    bundle = out / f"{NAMES[arch]}-bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    out.mkdir(parents=True, exist_ok=True)
    head = make_head(arch, out)
    rc = export_main([str(head), "--out", str(bundle), "--precision", "fp32"])
    if rc != 0:
        raise SystemExit(f"clipheads export failed for {arch} ({rc})")
    return bundle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", nargs="+", default=list(NAMES))
    args = ap.parse_args(argv)
    for arch in args.arch:
        print(make_bundle(arch, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
