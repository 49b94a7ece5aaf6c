"""The clipheads Python API end to end, offline, on the packaged tiny CLIP (about a minute on 2 CPU cores).

    python examples/quickstart.py [--out DIR]

1. render a small synthetic world (ImageFolder per domain, no train/test folders),
2. zero-shot CLIP and a CoOp head trained with its recipe defaults, 25% of each class held out,
3. save, reload and evaluate the head (the held-out split is re-carved from the head's record),
4. export a parity-gated ONNX bundle,
5. a Predictor on the bundle: the same image as a path, a PIL image and a numpy array, zero-shot labels.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import clipheads
from clipheads.training.data.synth import WorldSize, generate_world


def main(out: Path) -> None:
    world = generate_world(out / "world", seed=0, size=WorldSize(train=3, val=0, test=1))
    sketch = world / "sketch"  # 32 classes x 4 images, unsplit

    zero_shot = clipheads.train("zeroshot", sketch, test_fraction=0.25, progress=False)
    head = clipheads.train("coop", sketch, test_fraction=0.25, epochs=5, progress=False)
    rec = head.training_record
    print(f"defaults from {rec['defaults']}; held out {rec['holdout']['sketch']['counts']}")
    print(f"test top-1: zero-shot {zero_shot.training_record['metrics']['test_top1']['sketch']:.1%}, "
          f"CoOp {rec['metrics']['test_top1']['sketch']:.1%}")

    path = clipheads.save_head(head, out / "sketch.head.safetensors")
    again = clipheads.load_head(path)
    scores = clipheads.evaluate(again, sketch)  # the same 32 held-out images, from the head's record
    print(f"reloaded {path.name}: {scores['sketch']}")

    result = clipheads.export_bundle(again, out / "bundle", probes=8)
    print(f"bundle {result.bundle}: parity {'passed' if result.passed else 'FAILED'}")

    image_path = sorted((sketch / "circle").glob("*.png"))[0]
    with clipheads.Predictor(result.bundle) as predictor:
        as_path = predictor.predict(image_path, top_k=3)
        as_pil = predictor.predict(Image.open(image_path), top_k=3)
        as_array = predictor.predict(np.asarray(Image.open(image_path).convert("RGB")), top_k=3)
        assert as_path == as_pil == as_array, "one preprocessing path: same pixels, same answer"
        print(f"{predictor!r}\n{image_path.name}: {as_path['sketch']}")
        ranked = predictor.zero_shot(image_path, ["a circle", "a square", "a star"])
        print(f"zero-shot: {ranked}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = p.parse_args()
    if args.out:
        main(Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="clipheads-quickstart-") as tmp:
            main(Path(tmp))
