"""Few-shot subsets with Dassl's semantics, deterministic per seed, without touching global `random`.

Dassl (`DatasetBase.generate_fewshot_dataset`) seeds the global `random` with the run seed, then
for the train list and then the val list: groups items by label in order of first appearance and
draws `random.sample(items, K)` per label (all items when fewer than K). We replay the same
stream with a local `random.Random(seed)` (same Mersenne Twister state as `random.seed(seed)`),
so for the same input lists the subsets equal the ones Dassl caches in
`split_fewshot/shot_{K}-seed_{seed}.pkl`, and calling code's global random state is untouched.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterable, Sequence

from .records import DatasetSplits, Sample

VAL_SHOTS_CAP = 4  # Dassl/CoOp: val gets min(K, 4) per class


def sample_few_shot(samples: Sequence[Sample], shots: int, seed: int) -> tuple[Sample, ...]:
    """K samples per label (Dassl order and draws); `shots < 1` returns every sample."""
    return _draw(random.Random(seed), samples, shots)


def few_shot_splits(splits: DatasetSplits, shots: int, seed: int) -> DatasetSplits:
    """Train: K per class, val: min(K, 4) per class, drawn in that order from one seeded stream.

    Test is untouched. `shots < 1` returns `splits` unchanged. An empty val (ImageNet) draws
    nothing, as Dassl skips ImageNet's val.
    """
    if shots < 1:
        return splits
    rng = random.Random(seed)
    train = _draw(rng, splits.train, shots)
    val = _draw(rng, splits.val, min(shots, VAL_SHOTS_CAP))
    meta = {**splits.meta, "shots": shots, "fewshot_seed": seed}
    return replace(splits, train=train, val=val, meta=meta)


def _draw(rng: random.Random, samples: Sequence[Sample], shots: int) -> tuple[Sample, ...]:
    if shots < 1:
        return tuple(samples)
    out: list[Sample] = []
    for items in _by_label(samples):
        out.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return tuple(out)


def _by_label(samples: Iterable[Sample]) -> list[list[Sample]]:
    """Groups in order of each label's first appearance (Dassl's defaultdict order)."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    return list(groups.values())
