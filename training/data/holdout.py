"""Held-out splits for unsplit data (an ImageFolder or a CSV without a split column).

`carve(splits, val_fraction, test_fraction, seed)` moves a stratified, seeded share of each
class's training images to val and test with the readers' rule (`split_by_fraction`: Dassl's
DTD split, each class keeps a training image). The draw depends only on the image paths, the
fractions and the seed, so training (`--test-fraction 0.2`) and a later `eval` that reads the
head's record carve exactly the same test images.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .readers._common import split_by_fraction
from .records import DatasetSplits, Sample


class HoldOutError(ValueError):
    """Fractions that cannot be honoured (out of range, or the data already has that split)."""


def carve(splits: DatasetSplits, val_fraction: float = 0.0, test_fraction: float = 0.0,
          seed: int = 1) -> DatasetSplits:
    """`splits` with `val_fraction`/`test_fraction` of every class's train images moved out."""
    for name, f in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise HoldOutError(f"--{name}-fraction must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise HoldOutError("--val-fraction + --test-fraction must leave training images (sum below 1)")
    if val_fraction and splits.val:
        raise HoldOutError(f"{splits.name} already has a val split ({len(splits.val)} images); drop --val-fraction")
    if test_fraction and splits.test:
        raise HoldOutError(f"{splits.name} already has a test split ({len(splits.test)} images); drop --test-fraction")
    if not (val_fraction or test_fraction):
        return splits
    per_class: dict[int, list[Sample]] = {}
    for s in splits.train:
        per_class.setdefault(s.label, []).append(s)
    train, val, test = split_by_fraction([per_class[k] for k in sorted(per_class)], val_fraction, test_fraction, seed)
    record = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
              "counts": {"train": len(train), "val": len(val), "test": len(test)}}
    return replace(splits, train=train, val=tuple(splits.val) + val, test=tuple(splits.test) + test,
                   meta={**splits.meta, "holdout": record})


def holdout_record(splits: DatasetSplits) -> Optional[dict]:
    return splits.meta.get("holdout")
