"""Turn command-line data specs into named DatasetSplits.

A spec is one of:
  DIR                  an ImageFolder tree (DIR/<class>/*.png)
  FILE.json            a CoOp split_zhou file; images relative to `FILE`'s image dir
                       (for `WORLD/splits/<domain>.json` that is `WORLD/<domain>`, else the file's folder)
  FILE.csv             a manifest `path,label[,task]` (a `task` column makes one task per value)
  READER:ROOT[:ARG]    a registered dataset reader, e.g. `oxford_pets:/data` or `office_home:/data:art`
Several `--data` (or `--task NAME=SPEC`) make a multi-task run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .records import DatasetSplits


class DataSpecError(ValueError):
    """A --data/--task spec that names nothing readable."""


def _split_json_image_root(path: Path) -> Path:
    if path.parent.name == "splits":
        return path.parent.parent / path.stem
    return path.parent


def resolve_spec(spec: str) -> dict[str, DatasetSplits]:
    """One spec -> {task name: splits} (a CSV with a task column yields several)."""
    from . import readers

    path = Path(spec).expanduser()
    if path.is_dir():
        ds = readers.read_image_folder(path)
        # `.` or `photos/..` is named after the folder it means (abspath: no symlinks followed)
        return {Path(os.path.abspath(path)).name or "data": _with_source(ds, spec)}
    if path.suffix == ".json" and path.is_file():
        ds = readers.read_split_zhou(path, _split_json_image_root(path), name=path.stem)
        return {path.stem: _with_source(ds, spec)}
    if path.suffix == ".csv" and path.is_file():
        return {name: _with_source(ds, spec) for name, ds in readers.read_csv_tasks(path).items()}
    reader, sep, rest = spec.partition(":")
    if sep and reader in readers.list_readers():
        root, _, arg = rest.partition(":")
        option = readers.get_reader(reader).spec_arg  # the domain, or e.g. split_json's image root
        ds = readers.read_dataset(reader, root, **({option: arg} if arg else {}))
        return {f"{reader}-{arg}" if arg and option == "domain" else reader: _with_source(ds, spec)}
    if path.exists():
        raise DataSpecError(f"{spec}: expected an ImageFolder directory, a split_zhou .json or a .csv manifest")
    raise DataSpecError(
        f"{spec}: no such file or directory, and not READER:ROOT with a known reader "
        f"({', '.join(readers.list_readers())})"
    )


def resolve_recorded(name: str, spec: str) -> DatasetSplits:
    """Task `name` of the spec a head recorded for it: one task of a multi-task CSV, or the one task
    of any other spec (which `--task NAME=SPEC` may have named). DataSpecError if neither."""
    found = resolve_spec(spec)
    if name in found:
        return found[name]
    if len(found) == 1:
        return next(iter(found.values()))
    raise DataSpecError(f"{spec} holds tasks {', '.join(found)}, not {name!r}")


def _with_source(ds: DatasetSplits, spec: str) -> DatasetSplits:
    ds.meta.setdefault("source", spec)
    return ds


def resolve_tasks(data: Sequence[str], named: Sequence[str] = ()) -> dict[str, DatasetSplits]:
    """All --data and --task NAME=SPEC arguments -> ordered {task name: splits}."""
    out: dict[str, DatasetSplits] = {}
    for spec in data:
        for name, ds in resolve_spec(spec).items():
            out[_unique(out, name)] = ds
    for item in named:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise DataSpecError(f"--task expects NAME=DATA, got {item!r}")
        found = resolve_spec(spec)
        if len(found) != 1:
            raise DataSpecError(f"--task {name}: {spec} holds {len(found)} tasks; name them in the CSV instead")
        if name in out:  # a name the user chose is never silently renamed: clients address tasks by it
            raise DataSpecError(f"--task {name}: a task of that name is already given ({', '.join(out)})")
        out[name] = next(iter(found.values()))
    if not out:
        raise DataSpecError("no data given: use --data SPEC (or --task NAME=SPEC)")
    return out


def _unique(existing: dict, name: str) -> str:
    if name not in existing:
        return name
    k = 2
    while f"{name}-{k}" in existing:
        k += 1
    return f"{name}-{k}"
