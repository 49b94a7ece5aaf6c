"""Base-to-novel class split and the papers' averaging rules.

CoOp's `subsample_classes`: take the labels present in train, sort them, the first ceil(n/2) are
"base" and the rest "novel"; each subset is relabelled 0.. and applied to train/val/test
(METHODS.md §0.3). The "average over datasets" row reports mean base, mean novel and the
harmonic mean of those two means — not the mean of per-dataset HMs.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from ..data.records import DatasetSplits, Sample

SUBSETS = ("all", "base", "new")


def base_novel_labels(splits: DatasetSplits) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(base labels, novel labels) of `splits` by the ceil rule on sorted train labels."""
    labels = sorted({s.label for s in splits.train})
    if not labels:
        raise ValueError(f"{splits.name}: base-to-novel needs training samples to read the label set from")
    m = math.ceil(len(labels) / 2)
    return tuple(labels[:m]), tuple(labels[m:])


def subsample_classes(splits: DatasetSplits, subset: str = "all") -> DatasetSplits:
    """CoOp's `SUBSAMPLE_CLASSES`: "all" (unchanged), "base" or "new" (= novel)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}; got {subset!r}")
    if subset == "all":
        return splits
    base, novel = base_novel_labels(splits)
    return restrict_to_labels(splits, base if subset == "base" else novel, subset)


def base_novel_split(splits: DatasetSplits) -> tuple[DatasetSplits, DatasetSplits]:
    """(base, novel): each keeps only its classes, relabelled 0.., in train, val and test."""
    base, novel = base_novel_labels(splits)
    return restrict_to_labels(splits, base, "base"), restrict_to_labels(splits, novel, "new")


def restrict_to_labels(splits: DatasetSplits, labels: Sequence[int], subset: str = "") -> DatasetSplits:
    """Keep `labels` (in the given order) and renumber them 0..len-1; class names follow."""
    relabel = {old: new for new, old in enumerate(labels)}
    classnames = tuple(splits.classnames[old] for old in labels)

    def keep(samples: Sequence[Sample]) -> tuple[Sample, ...]:
        return tuple(replace(s, label=relabel[s.label]) for s in samples if s.label in relabel)

    meta = {**splits.meta, "subset": subset, "original_labels": tuple(labels)}
    return replace(splits, classnames=classnames, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test), meta=meta)


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN/(B+N); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@dataclass(frozen=True)
class BaseNovelScore:
    base: float
    novel: float
    hm: float


def base_novel_average(per_dataset: Iterable[tuple[float, float]]) -> BaseNovelScore:
    """Average row as the papers report it: mean base, mean novel, HM of those two means."""
    pairs = list(per_dataset)
    if not pairs:
        raise ValueError("no (base, novel) results to average")
    b = statistics.fmean(p[0] for p in pairs)
    n = statistics.fmean(p[1] for p in pairs)
    return BaseNovelScore(b, n, harmonic_mean(b, n))
