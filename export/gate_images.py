"""Real images for the parity gate and for int8 calibration (issue 17.3).

A gate on 24 probes (half of them noise) both passed int8 bundles that disagree with fp32 on 1.2%
of real images and failed random-init ones whose logits are all near-tied. So the gate and the
int8 calibration both draw from images a head will actually see:

1. the head's own training/validation images, when its record names data that is still on disk
   (`head.training_record["data"]`, written by `clipheads train`; never the test images it held
   out), topped up with world images where there are fewer than the sets ask for, else
2. the synthetic world (`clipheads.training.data.synth`): every domain and class in turn, rendered
   at the world's size and prepared like any image file (resize + center crop).

`gate_and_calibration` returns two disjoint sets from one source: the gate never scores an image
the quantizer calibrated on. Every set says where it came from (for the manifest).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from clipheads.training.preprocess import PreprocessSpec, prepare_pixels

WORLD_IMAGE_SIZE = 64  # what `clipheads data synth` writes


@dataclass
class ImageSet:
    pixels: np.ndarray  # (n, 3, S, S) uint8
    source: str  # "head data" | "synthetic world"
    detail: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"n": int(len(self.pixels)), "source": self.source, **self.detail}


def _head_samples(heads: Sequence) -> tuple[list, list[str]]:
    """Train + val samples of every dataset the heads' records name (existing files only), after
    the holdout each head carved from it: its test images stay unseen by export too."""
    from clipheads.training.data.holdout import carve
    from clipheads.training.data.sources import resolve_recorded

    samples, specs, held_out = [], [], set()
    for h in heads:
        record = getattr(h, "training_record", None) or {}
        for name, spec in (record.get("data") or {}).items():
            try:
                splits = {name: resolve_recorded(name, str(spec))}
            except Exception:  # noqa: BLE001 - moved or unreadable data: fall back to the world
                continue
            held = (record.get("holdout") or {}).get(name)
            for s in splits.values():
                if held:
                    try:
                        s = carve(s, held["val_fraction"], held["test_fraction"], held["seed"])
                    except (ValueError, KeyError):  # the data changed since (now has a test split): not the head's
                        continue
                held_out.update(os.path.realpath(x.path) for x in s.test)
                found = [x for x in (*s.train, *s.val) if _is_file(x.path)]
                if found:
                    samples += found
                    specs.append(str(spec))
    # one image once (two heads on one dataset list it twice: the gate, calibration and selection
    # sets drawn from these must stay disjoint), and never any head's held-out test image
    unique: dict[str, object] = {}
    for x in samples:
        real = os.path.realpath(x.path)
        if real not in held_out:
            unique.setdefault(real, x)
    return list(unique.values()), specs


def _is_file(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_file()


def head_images(heads: Sequence, spec: PreprocessSpec, n: int, seed: int = 0) -> Optional[ImageSet]:
    """Up to `n` of the heads' own training/validation images (seeded draw), or None. A file that
    does not decode (truncated, not an image, over the pixel cap) is skipped and the next one in the
    draw taken; `unreadable` counts those met (the caller tops up from the world like for missing files)."""
    samples, specs = _head_samples(heads)
    if not samples:
        return None
    px, unreadable = [], 0
    for i in np.random.default_rng(seed).permutation(len(samples)):
        if len(px) >= n:
            break
        try:
            px.append(prepare_pixels(samples[i].path, spec))
        except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for a bad file
            unreadable += 1
    if not px:
        return None
    detail = {"data": specs, "available": len(samples), "seed": seed}
    if unreadable:
        detail["unreadable"] = unreadable
    return ImageSet(np.stack(px), "head data", detail)


def world_images(spec: PreprocessSpec, n: int, seed: int = 0) -> ImageSet:
    """`n` synthetic-world images, domains and classes taken in turn."""
    from clipheads.training.data import synth

    return ImageSet(_world_pixels(spec, n, seed).copy(), "synthetic world",
                    {"seed": seed, "domains": list(synth.DOMAINS), "render_size": WORLD_IMAGE_SIZE})


@functools.lru_cache(maxsize=8)  # one export renders its sets once; tests export many bundles on one spec
def _world_pixels(spec: PreprocessSpec, n: int, seed: int) -> np.ndarray:
    from clipheads.training.data import synth

    imgs = []
    for i in range(n):
        domain = synth.DOMAINS[i % len(synth.DOMAINS)]
        cls = synth.CLASSES[(i // len(synth.DOMAINS)) % len(synth.CLASSES)]
        inst = synth.sample_instance(domain, cls, (seed, 1717, i))
        imgs.append(prepare_pixels(synth.render(inst, WORLD_IMAGE_SIZE), spec))
    out = np.stack(imgs)
    out.setflags(write=False)
    return out


def gate_and_calibration(heads: Sequence, spec: PreprocessSpec, n_gate: int, n_calib: int = 0,
                         seed: int = 0, source: str = "auto") -> tuple[ImageSet, Optional[ImageSet]]:
    """Disjoint gate and calibration sets from one source (`auto`: the heads' data, else the world;
    `world`: always the world). The calibration set is None when `n_calib` is 0."""
    if source not in ("auto", "world"):
        raise ValueError(f"image source must be auto or world, got {source!r}")
    both = head_images(heads, spec, n_gate + n_calib, seed) if source == "auto" else None
    if both is not None:
        short = n_gate + n_calib - len(both.pixels)
        if short > 0:  # fewer head images than asked: the world tops both sets up, shuffled in
            world = world_images(spec, short, seed)
            mixed = np.concatenate([both.pixels, world.pixels])[np.random.default_rng(seed).permutation(n_gate + n_calib)]
            both = ImageSet(mixed, "head data + synthetic world",
                            {**both.detail, "from_head_data": len(both.pixels), "from_world": short})
        gate = ImageSet(both.pixels[:n_gate], both.source, {**both.detail, "role": "gate"})
        calib = ImageSet(both.pixels[n_gate:], both.source, {**both.detail, "role": "calibration"}) if n_calib else None
        return gate, calib
    gate = world_images(spec, n_gate, seed)
    gate.detail["role"] = "gate"
    calib = None
    if n_calib:
        calib = world_images(spec, n_calib, seed + 1)  # another seed: other instances
        calib.detail["role"] = "calibration"
    return gate, calib



MIN_SPLIT = 8  # images on each side of the calibration / selection split, at least (pipeline validates it)


def split_selection(calib: ImageSet, n_select: int) -> tuple[ImageSet, Optional[ImageSet]]:
    """Calibration images -> (the ones that fit the int8 ranges, the held-out ones its search scores
    on), disjoint; no selection set when fewer than 8 images would be left on either side."""
    k = len(calib.pixels) - n_select
    if n_select <= 0 or k < MIN_SPLIT or n_select < MIN_SPLIT:
        return calib, None
    return (ImageSet(calib.pixels[:k], calib.source, {**calib.detail, "role": "calibration"}),
            ImageSet(calib.pixels[k:], calib.source, {**calib.detail, "role": "int8 selection"}))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, mid - half)), float(min(1.0, mid + half))
