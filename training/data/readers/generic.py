"""Generic layouts a user brings: an ImageFolder tree, one split_zhou JSON file, a CSV manifest.

These back `clipheads train --data DIR|FILE.json|FILE.csv` and are also registered as readers
("image_folder", "split_json", "csv") so recipes can name them.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..records import DatasetSplits, Sample
from ..templates import DEFAULT_TEMPLATE
from ._common import (
    SPLIT_KEYS,
    DatasetLayoutError,
    absolute,
    clean_classname,
    list_images_recursive,
    list_subdirs,
    read_split_json,
    read_text_lines,
    safe_join,
    split_by_fraction,
)
from ._registry import register_reader

_INT_LABEL = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses

IMAGE_FOLDER_LAYOUT = "<root>/<class>/*.{jpg,jpeg,png,webp,bmp} (or <root>/{train,val,test}/<class>/...)"


# ----------------------------------------------------------------------------- ImageFolder


@register_reader("image_folder")
def read_image_folder(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    name: str | None = None,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    domain: str = "",
) -> DatasetSplits:
    """`root/<class>/*.png`, classes in sorted folder order (names cleaned: `_` -> space).

    With `val_fraction`/`test_fraction`, each class is split deterministically by `seed`
    (see `split_by_fraction`). A root whose only sub-folders are train/val/test is read as
    pre-split trees sharing one class list (the union of their classes, sorted).
    """
    path = absolute(root)
    if not path.is_dir():
        raise DatasetLayoutError(f"image_folder: {path} is not a directory; expected {IMAGE_FOLDER_LAYOUT}")
    subdirs = list_subdirs(path)
    if "train" in subdirs and set(subdirs) <= set(SPLIT_KEYS):
        if val_fraction or test_fraction:
            raise ValueError(f"{path} is already split into {subdirs}; do not pass val/test fractions")
        return _read_presplit_folder(path, subdirs, name or path.name, tuple(templates), domain)
    listing = _class_listing(path)
    names = tuple(clean_classname(c) for c in listing)
    per_class = [[Sample(p, y, names[y], domain) for p in files] for y, files in enumerate(listing.values())]
    if val_fraction or test_fraction:
        train, val, test = split_by_fraction(per_class, val_fraction, test_fraction, seed)
    else:
        train, val, test = tuple(s for group in per_class for s in group), (), ()
    meta = {"reader": "image_folder", "root": str(path), "val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": seed}
    return DatasetSplits(name or path.name, names, train, val, test, tuple(templates), meta)


def _class_listing(path: Path) -> dict[str, list[str]]:
    """Sorted class folder -> its image paths; every class must hold at least one image."""
    listing = {c: list_images_recursive(path / c) for c in list_subdirs(path)}
    if not listing:
        raise DatasetLayoutError(f"image_folder: no class folders in {path}; expected {IMAGE_FOLDER_LAYOUT}")
    empty = [c for c, files in listing.items() if not files]
    if empty:
        raise DatasetLayoutError(f"image_folder: class folders without images in {path}: {empty[:10]}")
    return listing


def _read_presplit_folder(path: Path, splits: list[str], name: str, templates: tuple, domain: str) -> DatasetSplits:
    classes = sorted({c for s in splits for c in list_subdirs(path / s)})
    names = tuple(clean_classname(c) for c in classes)
    parts = {
        s: tuple(
            Sample(p, label, names[label], domain)
            for label, c in enumerate(classes) if (path / s / c).is_dir()
            for p in list_images_recursive(path / s / c)
        )
        for s in splits
    }
    if not parts["train"]:
        raise DatasetLayoutError(f"image_folder: no images in {path / 'train'}; expected {IMAGE_FOLDER_LAYOUT}")
    meta = {"reader": "image_folder", "root": str(path), "presplit": True}
    return DatasetSplits(name, names, parts["train"], parts.get("val", ()), parts.get("test", ()), templates, meta)


# ----------------------------------------------------------------------------- split_zhou JSON


@register_reader("split_json", spec_arg="image_root", spec_arg_is_path=True)  # split_json:FILE.json:IMAGE_ROOT
def read_split_zhou(
    root: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    domain: str = "",
) -> DatasetSplits:
    """One CoOp split_zhou JSON file (`root` is the file); images relative to `image_root`
    (default: the file's folder). Class names come from the file, cleaned."""
    path = absolute(root)
    if not path.is_file():
        raise DatasetLayoutError(f"split_json: no file {path}; expected a split_zhou JSON {{'train'|'val'|'test': [[path, label, classname], ...]}}")
    img_root = absolute(image_root) if image_root is not None else path.parent
    if not img_root.is_dir():
        raise DatasetLayoutError(f"split_json: image folder {img_root} for {path} does not exist")
    ls = read_split_json(path, img_root, domain=domain)
    meta = {"reader": "split_json", "split_file": str(path), "image_root": str(img_root)}
    return DatasetSplits(name or path.stem, ls.classnames, ls.train, ls.val, ls.test, tuple(templates), meta)


# ----------------------------------------------------------------------------- CSV manifests

CSV_LAYOUT = "a CSV with header path,label[,task][,split]; paths relative to the CSV's folder"


@dataclass(frozen=True)
class _Row:
    line: int
    path: str
    label: str
    task: str
    split: str


@register_reader("csv")
def read_csv(root: str | os.PathLike, *, name: str | None = None, templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> DatasetSplits:
    """A single-task CSV manifest (see `read_csv_tasks`); several tasks in it are an error."""
    tasks = read_csv_tasks(root, templates=templates)
    if len(tasks) != 1:
        raise DatasetLayoutError(f"{root}: holds {len(tasks)} tasks ({', '.join(tasks)}); use read_csv_tasks")
    ds = next(iter(tasks.values()))
    return DatasetSplits(name or ds.name, ds.classnames, ds.train, ds.val, ds.test, ds.templates, ds.meta)


def read_csv_tasks(path: str | os.PathLike, *, templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> dict[str, DatasetSplits]:
    """CSV manifest -> {task: splits}, tasks in order of first appearance.

    Columns (header required, case-insensitive): `path` (relative to the CSV's folder; absolute
    paths and `..` escapes are refused), `label` (a class name, or an int when every label is
    one), optional `task` (one DatasetSplits per value; default: the CSV's stem) and optional
    `split` (train/val/test; default train). Class order: sorted names per task; for int labels
    the names come from `classnames.txt` beside the CSV (line i = label i) or are the digits.
    """
    csv_path = absolute(path)
    rows = _read_csv_rows(csv_path)
    by_task: dict[str, list[_Row]] = {}
    for r in rows:
        by_task.setdefault(r.task or csv_path.stem, []).append(r)
    int_labels = all(_INT_LABEL.fullmatch(r.label) for r in rows)
    names_file = csv_path.parent / "classnames.txt"
    fixed_names = tuple(clean_classname(n) for n in read_text_lines(names_file)) if int_labels and names_file.is_file() else None
    _check_files_exist(csv_path, rows)
    _check_listed_once(csv_path, rows)
    return {
        task: _csv_task(csv_path, task, task_rows, int_labels, fixed_names, tuple(templates))
        for task, task_rows in by_task.items()
    }


def _read_csv_rows(csv_path: Path) -> list[_Row]:
    if not csv_path.is_file():
        raise DatasetLayoutError(f"csv: no file {csv_path}; expected {CSV_LAYOUT}")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise DatasetLayoutError(f"{csv_path}: header {header} lacks path/label; expected {CSV_LAYOUT}")
        col = {h: i for i, h in enumerate(header)}
        rows = [_csv_row(csv_path, n, cells, col) for n, cells in enumerate(reader, start=2) if any(c.strip() for c in cells)]
    if not rows:
        raise DatasetLayoutError(f"{csv_path}: no rows after the header")
    return rows


def _csv_row(csv_path: Path, line: int, cells: list[str], col: dict[str, int]) -> _Row:
    def get(key: str) -> str:
        i = col.get(key)
        return cells[i].strip() if i is not None and i < len(cells) else ""

    where = f"{csv_path}:{line}"
    rel, label, split = get("path"), get("label"), get("split").lower() or "train"
    if not label:
        raise DatasetLayoutError(f"{where}: empty label")
    if split not in SPLIT_KEYS:
        raise DatasetLayoutError(f"{where}: split {split!r} is not one of {', '.join(SPLIT_KEYS)}")
    return _Row(line, safe_join(csv_path.parent, rel, where), label, get("task"), split)


def _check_listed_once(csv_path: Path, rows: list[_Row]) -> None:
    """An image appears once per task: listed again (another split, another label, or the same
    file by another path) it would be trained on and tested on, or carved into both sides of a
    --test-fraction, and every score on it would be a training-image score."""
    first: dict[tuple[str, str], _Row] = {}
    for r in rows:
        seen = first.setdefault((r.task, os.path.realpath(r.path)), r)
        if seen is not r:
            how = f" (as {seen.split} there, {r.split} here)" if seen.split != r.split else ""
            raise DatasetLayoutError(f"{csv_path}: line {r.line} lists the image of line {seen.line} again{how}: "
                                     f"{r.path}; list each image once per task")


def _check_files_exist(csv_path: Path, rows: list[_Row]) -> None:
    """Fail at read time, with line numbers, rather than mid-training in the data loader."""
    missing = [r for r in rows if not os.path.isfile(r.path)]
    if missing:
        shown = ", ".join(f"line {r.line}: {r.path}" for r in missing[:5])
        raise DatasetLayoutError(f"{csv_path}: {len(missing)} image(s) not found ({shown}{', ...' if len(missing) > 5 else ''})")


def _csv_task(
    csv_path: Path, task: str, rows: list[_Row], int_labels: bool, fixed_names: tuple[str, ...] | None, templates: tuple
) -> DatasetSplits:
    classnames, label_of = _csv_classes(csv_path, rows, int_labels, fixed_names)
    parts: dict[str, list[Sample]] = {k: [] for k in SPLIT_KEYS}
    for r in rows:
        y = label_of[r.label]
        parts[r.split].append(Sample(r.path, y, classnames[y]))
    meta = {"reader": "csv", "manifest": str(csv_path), "task": task}
    return DatasetSplits(task, classnames, tuple(parts["train"]), tuple(parts["val"]), tuple(parts["test"]), templates, meta)


def _csv_classes(csv_path: Path, rows: list[_Row], int_labels: bool, fixed_names: tuple[str, ...] | None):
    """(classnames, raw label -> int) for one task."""
    if not int_labels:
        names = tuple(sorted({clean_classname(r.label) for r in rows}))
        index = {n: i for i, n in enumerate(names)}
        return names, {r.label: index[clean_classname(r.label)] for r in rows}
    values = {r.label: int(r.label) for r in rows}
    bad = sorted(v for v in values.values() if v < 0 or (fixed_names is not None and v >= len(fixed_names)))
    if bad:
        limit = f"0..{len(fixed_names) - 1} (classnames.txt)" if fixed_names is not None else ">= 0"
        raise DatasetLayoutError(f"{csv_path}: int labels must be {limit}; got {bad[:5]}")
    if fixed_names is not None:
        return fixed_names, values
    used = sorted(set(values.values()))
    if used == list(range(len(used))):  # 0..n-1: class indices, named after themselves
        return tuple(str(i) for i in used), values
    # other numbers without a classnames.txt (747, 1-based ids) are names: indices would make empty classes
    index = {v: i for i, v in enumerate(used)}
    return tuple(str(v) for v in used), {raw: index[v] for raw, v in values.items()}
