"""The CoOp benchmark datasets (Zhou et al.), read from the layouts CoOp's DATASETS.md prescribes.

Nine of them ship a `split_zhou_*.json`; the table below is all that differs between them.
FGVCAircraft uses the official variant lists. ImageNet and its variants live in `imagenet.py`.
Facts from KaiyangZhou/CoOp `datasets/*.py` (METHODS.md §0.3); the code is ours.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..records import DatasetSplits, Sample
from ..templates import templates_for
from ._common import DatasetLayoutError, clean_classname, dataset_dir, read_split_json, read_text_lines, safe_join
from ._registry import register_reader

# CoOp renames (applied to raw folder names; the released split files already hold the new ones,
# so applying them is idempotent).
EUROSAT_NAMES: Mapping[str, str] = MappingProxyType({
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
})
CALTECH101_NAMES: Mapping[str, str] = MappingProxyType({
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
})


@dataclass(frozen=True)
class SplitJsonDataset:
    """Where one split_zhou dataset lives below the data root."""

    reader: str        # our registry name
    dassl_name: str    # CoOp/Dassl name (keys the template table)
    folder: str        # <root>/<folder>
    image_dir: str     # split paths are relative to <root>/<folder>/<image_dir> ("" = the folder)
    split_file: str
    rename: Mapping[str, str] = field(default_factory=dict)


SPLIT_JSON_DATASETS: tuple[SplitJsonDataset, ...] = (
    SplitJsonDataset("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
    SplitJsonDataset("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", CALTECH101_NAMES),
    SplitJsonDataset("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    SplitJsonDataset("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    SplitJsonDataset("food101", "Food101", "food-101", "images", "split_zhou_Food101.json"),
    SplitJsonDataset("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    SplitJsonDataset("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json"),
    SplitJsonDataset("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", EUROSAT_NAMES),
    SplitJsonDataset("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
)


def read_split_json_dataset(spec: SplitJsonDataset, root: str | os.PathLike) -> DatasetSplits:
    """One CoOp dataset from its split_zhou file; class names cleaned (`_` -> space, CoOp renames)."""
    required = (spec.image_dir, spec.split_file) if spec.image_dir else (spec.split_file,)
    ddir = dataset_dir(spec.reader, root, spec.folder, required)
    ls = read_split_json(ddir / spec.split_file, ddir / spec.image_dir, rename=spec.rename)
    meta = {"reader": spec.reader, "dassl_name": spec.dassl_name, "dataset_dir": str(ddir)}
    return DatasetSplits(spec.dassl_name, ls.classnames, ls.train, ls.val, ls.test, templates_for(spec.dassl_name), meta)


def _make_reader(spec: SplitJsonDataset):
    def reader(root: str | os.PathLike) -> DatasetSplits:
        return read_split_json_dataset(spec, root)

    reader.__name__ = f"read_{spec.reader}"
    reader.__doc__ = f"{spec.dassl_name}: <root>/{spec.folder}/{spec.split_file}, images in <root>/{spec.folder}/{spec.image_dir}."
    return reader


for _spec in SPLIT_JSON_DATASETS:
    register_reader(_spec.reader)(_make_reader(_spec))


# ----------------------------------------------------------------------------- FGVCAircraft

AIRCRAFT_SPLITS = {"train": "images_variant_train.txt", "val": "images_variant_val.txt", "test": "images_variant_test.txt"}


@register_reader("fgvc_aircraft")
def read_fgvc_aircraft(root: str | os.PathLike) -> DatasetSplits:
    """FGVCAircraft: labels = line order of `variants.txt`; lists hold `<image id> <variant name>`."""
    ddir = dataset_dir("fgvc_aircraft", root, "fgvc_aircraft", ("images", "variants.txt", *AIRCRAFT_SPLITS.values()))
    classnames = tuple(read_text_lines(ddir / "variants.txt"))
    label_of = {c: i for i, c in enumerate(classnames)}
    parts = {k: _aircraft_split(ddir, f, label_of) for k, f in AIRCRAFT_SPLITS.items()}
    names = tuple(clean_classname(c) for c in classnames)
    parts = {k: tuple(Sample(p, y, names[y]) for p, y in v) for k, v in parts.items()}
    meta = {"reader": "fgvc_aircraft", "dassl_name": "FGVCAircraft", "dataset_dir": str(ddir)}
    return DatasetSplits("FGVCAircraft", names, parts["train"], parts["val"], parts["test"], templates_for("FGVCAircraft"), meta)


def _aircraft_split(ddir, filename: str, label_of: Mapping[str, int]) -> list[tuple[str, int]]:
    out = []
    for n, line in enumerate(read_text_lines(ddir / filename), start=1):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise DatasetLayoutError(f"{ddir / filename}:{n}: variant {variant!r} is not in variants.txt")
        out.append((safe_join(ddir / "images", image_id + ".jpg", f"{filename}:{n}"), label_of[variant]))
    return out
