"""Multi-domain datasets where each domain is a task: Office-Home, MiniDomainNet, our synthetic world.

Each reader takes `domain=` and returns that domain's splits; `read_domains(name, root)` in the
registry returns all of them. Sample.domain carries the domain name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..records import DatasetSplits, Sample
from ..templates import DEFAULT_TEMPLATE
from ._common import (
    DatasetLayoutError,
    absolute,
    classnames_from_labels,
    clean_classname,
    dataset_dir,
    list_images_recursive,
    list_subdirs,
    read_split_json,
    read_text_lines,
    safe_join,
    split_by_fraction,
)
from ._registry import register_reader


def _check_domain(reader: str, domain: str | None, known: tuple[str, ...]) -> str:
    if domain not in known:
        raise DatasetLayoutError(f"{reader}: domain must be one of {', '.join(known)} ({reader}:ROOT:DOMAIN); got {domain!r}")
    return domain


# ----------------------------------------------------------------------------- Office-Home

OFFICE_HOME_DOMAINS = ("art", "clipart", "product", "real_world")
# The original archive names the folders "Art", "Clipart", "Product", "Real World"; Dassl's copy is lower-case.
_OFFICE_HOME_FOLDERS = {"real_world": ("real_world", "Real World", "Real_World", "RealWorld")}
OFFICE_HOME_FRACTIONS = (0.6, 0.2, 0.2)


@register_reader("office_home", domains=OFFICE_HOME_DOMAINS)
def read_office_home(root: str | os.PathLike, *, domain: str | None = None, split_seed: int = 0) -> DatasetSplits:
    """One Office-Home domain, 65 classes (sorted folders, names lower-cased and cleaned as Dassl).

    Office-Home ships no split; we split each class 60/20/20 train/val/test, the convention of
    multi-task libraries such as LibMTL, deterministically by `split_seed` (fixed at 0 by default so
    the split does not change with the run seed; few-shot sampling varies with the run seed).
    """
    domain = _check_domain("office_home", domain, OFFICE_HOME_DOMAINS)
    ddir = absolute(root) / "office_home"
    ddir = ddir if ddir.is_dir() else absolute(root)  # root may be the office_home folder itself
    domain_dir = _office_home_domain_dir(ddir, domain, absolute(root))
    classes = list_subdirs(domain_dir)
    names = tuple(clean_classname(c.lower()) for c in classes)
    per_class = [[Sample(p, y, names[y], domain) for p in list_images_recursive(domain_dir / c)] for y, c in enumerate(classes)]
    _, val_f, test_f = OFFICE_HOME_FRACTIONS
    train, val, test = split_by_fraction(per_class, val_f, test_f, split_seed)
    meta = {"reader": "office_home", "domain": domain, "dataset_dir": str(ddir), "split_seed": split_seed,
            "split_fractions": OFFICE_HOME_FRACTIONS}
    return DatasetSplits(f"office_home-{domain}", names, train, val, test, (DEFAULT_TEMPLATE,), meta)


def _office_home_domain_dir(ddir: Path, domain: str, root: Path) -> Path:
    candidates = _OFFICE_HOME_FOLDERS.get(domain, (domain, domain.capitalize()))
    for name in candidates:
        if (ddir / name).is_dir() and list_subdirs(ddir / name):
            return ddir / name
    raise DatasetLayoutError(
        f"office_home: expected <root>/office_home/{domain}/<class>/*.jpg with root = {root}; "
        f"{ddir / candidates[0]} has no class folders"
    )


# ----------------------------------------------------------------------------- MiniDomainNet

MINI_DOMAINNET_DOMAINS = ("clipart", "painting", "real", "sketch")


@register_reader("mini_domainnet", domains=MINI_DOMAINNET_DOMAINS)
def read_mini_domainnet(root: str | os.PathLike, *, domain: str | None = None) -> DatasetSplits:
    """One MiniDomainNet domain from `domainnet/splits_mini/{domain}_{train,test}.txt` (Dassl).

    Lines are `<domain>/<class>/<file> <label>`, paths relative to `<root>/domainnet`; the class
    name is the path's second component. There is no val split (as in Dassl).
    """
    domain = _check_domain("mini_domainnet", domain, MINI_DOMAINNET_DOMAINS)
    files = tuple(f"splits_mini/{domain}_{s}.txt" for s in ("train", "test"))
    ddir = dataset_dir("mini_domainnet", root, "domainnet", files)
    rows = {s: _domainnet_rows(ddir, f) for s, f in zip(("train", "test"), files)}
    classnames = classnames_from_labels(((y, n) for s in rows.values() for _, y, n in s), str(ddir / "splits_mini"))
    parts = {s: tuple(Sample(p, y, classnames[y], domain) for p, y, _ in r) for s, r in rows.items()}
    meta = {"reader": "mini_domainnet", "domain": domain, "dataset_dir": str(ddir)}
    return DatasetSplits(f"mini_domainnet-{domain}", classnames, parts["train"], (), parts["test"], (DEFAULT_TEMPLATE,), meta)


def _domainnet_rows(ddir: Path, rel: str) -> list[tuple[str, int, str]]:
    out = []
    for n, line in enumerate(read_text_lines(ddir / rel), start=1):
        where = f"{ddir / rel}:{n}"
        path, _, label = line.rpartition(" ")
        parts = path.split("/")
        if not label.isdigit() or len(parts) < 3:
            raise DatasetLayoutError(f"{where}: expected '<domain>/<class>/<file> <label>', got {line!r}")
        out.append((safe_join(ddir, path, where), int(label), clean_classname(parts[1])))
    return out


# ----------------------------------------------------------------------------- synthetic world

SYNTHETIC_LAYOUT = "<root>/world.json, <root>/<domain>/<class>/*.png and <root>/splits/<domain>.json"


def synthetic_domains(root: str | os.PathLike) -> tuple[str, ...]:
    """Domains of a world written by `clipheads data synth`: world.json's list, else splits/*.json."""
    world = _world(absolute(root))
    listed = world.get("domains") or []
    names = tuple(d if isinstance(d, str) else d.get("name", "") for d in listed)
    if names and all(names):
        return names
    return tuple(sorted(p.stem for p in (absolute(root) / "splits").glob("*.json")))


@register_reader("synthetic", domains=synthetic_domains)
def read_synthetic(root: str | os.PathLike, *, domain: str | None = None) -> DatasetSplits:
    """One domain of the synthetic world: `splits/<domain>.json` (split_zhou), images under `<domain>/`."""
    path = absolute(root)
    world = _world(path)
    domain = _check_domain("synthetic", domain, synthetic_domains(path))
    split_file, image_root = path / "splits" / f"{domain}.json", path / domain
    if not split_file.is_file() or not image_root.is_dir():
        raise DatasetLayoutError(f"synthetic: expected {SYNTHETIC_LAYOUT}; missing {split_file if not split_file.is_file() else image_root}")
    ls = read_split_json(split_file, image_root, domain=domain)
    templates = _world_templates(world)
    meta = {"reader": "synthetic", "domain": domain, "world": str(path), "world_seed": world.get("seed")}
    return DatasetSplits(f"synthetic-{domain}", ls.classnames, ls.train, ls.val, ls.test, templates, meta)


def _world(path: Path) -> dict:
    try:
        world = json.loads((path / "world.json").read_text())
    except FileNotFoundError:
        raise DatasetLayoutError(f"synthetic: expected {SYNTHETIC_LAYOUT} with root = {path}; missing {path / 'world.json'}") from None
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(f"synthetic: {path / 'world.json'} is not valid JSON: {err}") from None
    if not isinstance(world, dict):
        raise DatasetLayoutError(f"synthetic: {path / 'world.json'} must hold a JSON object")
    return world


def _world_templates(world: dict) -> tuple[str, ...]:
    """The world's own templates when it lists valid ones, else CLIP's default."""
    t = world.get("templates")
    if isinstance(t, list) and t and all(isinstance(x, str) and "{}" in x for x in t):
        return tuple(t)
    return (DEFAULT_TEMPLATE,)
