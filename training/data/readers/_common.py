"""Pieces every reader shares: layout errors, safe relative paths, listings, split_zhou parsing.

Readers only list files (no pixels, no torch), so they stay fast on trees of tiny test images and
on ImageNet's 1.28M file names alike.
"""
from __future__ import annotations

import json
import os
import posixpath
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ...classnames import alike_classnames, clean_classname  # noqa: F401 (re-exported to readers)
from ..records import Sample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_KEYS = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    """A dataset root (or file) that does not have the layout its reader expects."""


# ----------------------------------------------------------------------------- paths


def absolute(path: str | os.PathLike) -> Path:
    """User paths may start with ~ or be relative to the working directory."""
    return Path(path).expanduser().resolve()


def safe_join(base: Path, rel: str, where: str) -> str:
    """`base/rel` as an absolute path; refuses absolute paths and `..` escaping `base`.

    Why: manifests and split files come from users; a row must not point the loader at files
    outside the folder the manifest describes.
    """
    text = rel.strip().replace("\\", "/")
    if not text:
        raise DatasetLayoutError(f"{where}: empty image path")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise DatasetLayoutError(f"{where}: absolute path {rel!r} not allowed; give paths relative to {base}")
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        raise DatasetLayoutError(f"{where}: path {rel!r} escapes {base}; paths must stay inside it")
    return str(base / norm)


def dataset_dir(reader: str, root: str | os.PathLike, folder: str, required: Sequence[str]) -> Path:
    """`root/folder` (or `root` itself when it already is that folder) holding every `required` entry."""
    root_path = absolute(root)
    for cand in (root_path / folder, root_path):
        if all((cand / r).exists() for r in required):
            return cand
    expected = " and ".join(f"<root>/{folder}/{r}" for r in required)
    missing = next(str(root_path / folder / r) for r in required if not (root_path / folder / r).exists())
    state = "" if root_path.is_dir() else " (root does not exist)"
    raise DatasetLayoutError(f"{reader}: expected {expected} with root = {root_path}{state}; missing {missing}")


# ----------------------------------------------------------------------------- listings


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(directory: Path) -> list[str]:
    """Sorted image file names directly inside `directory` (hidden files skipped)."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if e.is_file() and is_image(e.name))


def list_images_recursive(directory: Path) -> list[str]:
    """Sorted absolute image paths anywhere below `directory` (as torchvision's ImageFolder walks)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if is_image(f))
    return sorted(out)


def list_subdirs(directory: Path) -> list[str]:
    """Sorted names of the non-hidden sub-directories of `directory`."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


# ----------------------------------------------------------------------------- label lists


@dataclass(frozen=True)
class LabelledSplits:
    """Reader-internal result before it becomes a DatasetSplits."""

    classnames: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...] = ()
    test: tuple[Sample, ...] = ()


def classnames_from_labels(pairs: Iterable[tuple[int, str]], where: str) -> tuple[str, ...]:
    """Label -> name table from (label, name) pairs; labels must be 0..n-1 with one name each."""
    names: dict[int, str] = {}
    for label, name in pairs:
        if names.setdefault(label, name) != name:
            raise DatasetLayoutError(f"{where}: label {label} has two class names, {names[label]!r} and {name!r}")
    missing = sorted(set(range(len(names))) - set(names))
    if missing or any(k < 0 for k in names):
        raise DatasetLayoutError(f"{where}: labels must be 0..{len(names) - 1} without gaps; got {sorted(names)[:10]}...")
    return tuple(names[i] for i in range(len(names)))


def samples_from_class_dirs(class_dirs: Sequence[Path], names: Sequence[str], domain: str = "") -> tuple[Sample, ...]:
    """Label i = class_dirs[i]; every image directly inside it, in file-name order.

    A missing class dir contributes nothing (a partial copy keeps the other labels aligned)."""
    return tuple(
        Sample(str(d / f), label, names[label], domain)
        for label, d in enumerate(class_dirs) if d.is_dir()
        for f in list_images(d)
    )


def split_by_fraction(
    per_class: Sequence[Sequence[Sample]], val_fraction: float, test_fraction: float, seed: int
) -> tuple[tuple[Sample, ...], tuple[Sample, ...], tuple[Sample, ...]]:
    """Per class: shuffle with Random(seed), first round(n*train) -> train, next round(n*val) -> val, rest test.

    The same rule as Dassl's DTD.read_and_split_data (one Random stream over classes in label
    order), except that each class keeps at least one training image. Deterministic per seed.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0 and sum below 1")
    rng = random.Random(seed)
    train, val, test = [], [], []
    for items in per_class:
        items = sorted(items, key=lambda s: s.path)
        rng.shuffle(items)
        n_train = max(1, round(len(items) * (1 - val_fraction - test_fraction))) if items else 0
        n_val = min(round(len(items) * val_fraction), len(items) - n_train)
        train += items[:n_train]
        val += items[n_train:n_train + n_val]
        test += items[n_train + n_val:]
    return tuple(train), tuple(val), tuple(test)


# ----------------------------------------------------------------------------- split_zhou


def read_split_json(
    path: Path, image_root: Path, rename: Mapping[str, str] | None = None, domain: str = ""
) -> LabelledSplits:
    """Parse a CoOp `split_zhou` file: {"train"|"val"|"test": [[rel_path, label, classname], ...]}.

    `rename` maps raw class names to the names CoOp uses (EuroSAT, Caltech101); names are then
    cleaned. Paths are joined to `image_root` and may not escape it.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is accepted, as in CSV manifests
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetLayoutError(f"{path}: not a readable split_zhou JSON file: {err}") from None
    if not isinstance(data, dict) or "train" not in data or set(data) - set(SPLIT_KEYS):
        raise DatasetLayoutError(f"{path}: expected a JSON object with keys 'train', 'val', 'test'")
    rename = rename or {}
    rows = {k: [_split_row(path, k, i, row) for i, row in enumerate(data.get(k) or [])] for k in SPLIT_KEYS}
    pairs = ((label, clean_classname(rename.get(name, name))) for k in SPLIT_KEYS for _, label, name in rows[k])
    classnames = classnames_from_labels(pairs, str(path))

    def samples(key: str) -> tuple[Sample, ...]:
        return tuple(
            Sample(safe_join(image_root, rel, f"{path} {key}[{i}]"), label, classnames[label], domain)
            for i, (rel, label, _) in enumerate(rows[key])
        )

    return LabelledSplits(classnames, samples("train"), samples("val"), samples("test"))


def _split_row(path: Path, key: str, i: int, row) -> tuple[str, int, str]:
    ok = (
        isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)
        and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str)
    )
    if not ok:
        raise DatasetLayoutError(f"{path} {key}[{i}]: expected [relative_path, int label, classname], got {row!r:.80}")
    return row[0], row[1], row[2]


def read_text_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a small text file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
