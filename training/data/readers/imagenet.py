"""ImageNet and the four domain-generalisation targets (V2, Sketch, A, R), CoOp layouts.

Class names come from a `classnames.txt` (`<wnid> <name words>` per line, CoOp's file). The
variants are evaluation-only: their images are in `test`, `train` is empty.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..records import DatasetSplits
from ..templates import templates_for
from ._common import DatasetLayoutError, absolute, clean_classname, dataset_dir, list_subdirs, read_text_lines, samples_from_class_dirs
from ._registry import register_reader


def read_classnames(path: Path) -> dict[str, str]:
    """wnid -> class name, in file order."""
    out: dict[str, str] = {}
    for line in read_text_lines(path):
        wnid, _, name = line.partition(" ")
        out[wnid] = clean_classname(name)
    return out


def _classnames_file(ddir: Path, root: str | os.PathLike, reader: str) -> Path:
    """CoOp copies ImageNet's classnames.txt into each variant's folder; fall back to ImageNet's."""
    for cand in (ddir / "classnames.txt", absolute(root) / "imagenet" / "classnames.txt"):
        if cand.is_file():
            return cand
    raise DatasetLayoutError(f"{reader}: expected {ddir / 'classnames.txt'} (or <root>/imagenet/classnames.txt)")


def _names_for(wnids: list[str], table: dict[str, str], where: str) -> tuple[str, ...]:
    unknown = [w for w in wnids if w not in table]
    if unknown:
        raise DatasetLayoutError(f"{where}: folders not in classnames.txt: {unknown[:5]}")
    return tuple(table[w] for w in wnids)


@register_reader("imagenet")
def read_imagenet(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet: labels = sorted wnid folders of images/train; images/val is the test set (as CoOp)."""
    ddir = dataset_dir("imagenet", root, "imagenet", ("images/train", "images/val", "classnames.txt"))
    wnids = list_subdirs(ddir / "images" / "train")
    names = _names_for(wnids, read_classnames(ddir / "classnames.txt"), str(ddir / "images" / "train"))
    extra = sorted(set(list_subdirs(ddir / "images" / "val")) - set(wnids))
    if extra:
        raise DatasetLayoutError(f"imagenet: val folders missing from train: {extra[:5]}")
    train = samples_from_class_dirs([ddir / "images" / "train" / w for w in wnids], names)
    test = samples_from_class_dirs([ddir / "images" / "val" / w for w in wnids], names)
    meta = {"reader": "imagenet", "dassl_name": "ImageNet", "dataset_dir": str(ddir), "val_is_test": True}
    return DatasetSplits("ImageNet", names, train, (), test, templates_for("ImageNet"), meta)


def _read_wnid_folders(reader: str, dassl_name: str, root, folder: str, image_dir: str) -> DatasetSplits:
    """A test-only set of `<image_dir>/<wnid>/` folders: labels = sorted wnid order (files such as
    README.txt are not folders and drop out, as CoOp ignores them)."""
    ddir = dataset_dir(reader, root, folder, (image_dir,))
    wnids = list_subdirs(ddir / image_dir)
    names = _names_for(wnids, read_classnames(_classnames_file(ddir, root, reader)), str(ddir / image_dir))
    test = samples_from_class_dirs([ddir / image_dir / w for w in wnids], names)
    meta = {"reader": reader, "dassl_name": dassl_name, "dataset_dir": str(ddir), "wnids": tuple(wnids)}
    return DatasetSplits(dassl_name, names, (), (), test, templates_for(dassl_name), meta)


@register_reader("imagenet_sketch")
def read_imagenet_sketch(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-Sketch: <root>/imagenet-sketch/images/<wnid>/, 1000 classes."""
    return _read_wnid_folders("imagenet_sketch", "ImageNetSketch", root, "imagenet-sketch", "images")


@register_reader("imagenet_a")
def read_imagenet_a(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-A: <root>/imagenet-adversarial/imagenet-a/<wnid>/, the 200-class subset."""
    return _read_wnid_folders("imagenet_a", "ImageNetA", root, "imagenet-adversarial", "imagenet-a")


@register_reader("imagenet_r")
def read_imagenet_r(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-R: <root>/imagenet-rendition/imagenet-r/<wnid>/, the 200-class subset."""
    return _read_wnid_folders("imagenet_r", "ImageNetR", root, "imagenet-rendition", "imagenet-r")


V2_IMAGE_DIR = "imagenetv2-matched-frequency-format-val"


@register_reader("imagenet_v2")
def read_imagenet_v2(root: str | os.PathLike) -> DatasetSplits:
    """ImageNet-V2 matched-frequency: folders 0..999; label i = line i of classnames.txt."""
    ddir = dataset_dir("imagenet_v2", root, "imagenetv2", (V2_IMAGE_DIR,))
    table = read_classnames(_classnames_file(ddir, root, "imagenet_v2"))
    names = tuple(table.values())
    folders = list_subdirs(ddir / V2_IMAGE_DIR)
    bad = [f for f in folders if not f.isdigit() or int(f) >= len(names)]
    if bad:
        raise DatasetLayoutError(f"imagenet_v2: folders must be 0..{len(names) - 1}; found {bad[:5]} in {ddir / V2_IMAGE_DIR}")
    test = samples_from_class_dirs([ddir / V2_IMAGE_DIR / str(i) for i in range(len(names))], names)
    meta = {"reader": "imagenet_v2", "dassl_name": "ImageNetV2", "dataset_dir": str(ddir)}
    return DatasetSplits("ImageNetV2", names, (), (), test, templates_for("ImageNetV2"), meta)
