"""Plain records every dataset reader returns: a labelled image path and a split of them.

Readers only list files; decoding and transforms happen in the data loader, so a reader can be
tested on trees of tiny images and a protocol can re-label subsets without touching pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One labelled image. `path` is absolute; `label` indexes `DatasetSplits.classnames`."""

    path: str
    label: int
    classname: str
    domain: str = ""


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset as train/val/test lists sharing one class list (canonical label order)."""

    name: str
    classnames: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...] = ()
    test: tuple[Sample, ...] = ()
    # Hand-crafted zero-shot template(s) for this dataset, e.g. ("a photo of a {}.",).
    templates: tuple[str, ...] = ("a photo of a {}.",)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
