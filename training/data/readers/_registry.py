"""Reader registry: `@register_reader("name")`, `read_dataset(name, root, **kw)`, `list_readers()`.

Explicit, as timm's model registry: duplicates are refused and an unknown name fails with the
list of known ones, so a typo in a recipe is caught before any file is touched.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from ..records import DatasetSplits
from ._common import DatasetLayoutError

ReaderFn = Callable[..., DatasetSplits]
# A fixed domain list, or a function root -> domains for readers whose domains live in the data.
Domains = Union[Sequence[str], Callable[[str], Sequence[str]]]


@dataclass(frozen=True)
class ReaderInfo:
    name: str
    fn: ReaderFn
    domains: Domains = ()
    spec_arg: str = "domain"  # the option a `READER:ROOT:ARG` spec's ARG sets
    spec_arg_is_path: bool = False  # ARG is a path (made absolute where heads record their data)


_READERS: dict[str, ReaderInfo] = {}


def register_reader(name: str, *, domains: Domains = (), spec_arg: str = "domain",
                    spec_arg_is_path: bool = False) -> Callable[[ReaderFn], ReaderFn]:
    """Register `fn(root, **kw) -> DatasetSplits` under `name`; readers with `domains` take `domain=`.
    `spec_arg`: the option that the third field of a `READER:ROOT:ARG` data spec sets."""

    def deco(fn: ReaderFn) -> ReaderFn:
        if name in _READERS:
            raise ValueError(f"dataset reader {name!r} registered twice")
        _READERS[name] = ReaderInfo(name, fn, domains, spec_arg, spec_arg_is_path)
        return fn

    return deco


def list_readers() -> list[str]:
    return sorted(_READERS)


def get_reader(name: str) -> ReaderInfo:
    if name not in _READERS:
        raise DatasetLayoutError(f"unknown dataset reader {name!r}; known: {', '.join(list_readers())}")
    return _READERS[name]


def read_dataset(name: str, root: str | os.PathLike, **kwargs) -> DatasetSplits:
    """Read dataset `name` below `root` (the folder that holds e.g. `oxford_pets/`)."""
    info = get_reader(name)
    _check_kwargs(info, kwargs)
    return info.fn(root, **kwargs)


def list_domains(name: str, root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Domains of a multi-domain reader (empty for single-domain ones)."""
    domains = get_reader(name).domains
    if callable(domains):
        if root is None:
            raise ValueError(f"{name}: its domains are read from the data; give root")
        return tuple(domains(str(root)))
    return tuple(domains)


def read_domains(name: str, root: str | os.PathLike, **kwargs) -> dict[str, DatasetSplits]:
    """Every domain of a multi-domain reader as its own task: {domain: splits}."""
    domains = list_domains(name, root)
    if not domains:
        raise ValueError(f"{name} is not a multi-domain reader")
    return {d: read_dataset(name, root, domain=d, **kwargs) for d in domains}


def _check_kwargs(info: ReaderInfo, kwargs: dict) -> None:
    """A clear message instead of Python's TypeError when a recipe passes an unknown option."""
    params = inspect.signature(info.fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and n != "root")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise DatasetLayoutError(f"dataset reader {info.name!r} takes no option {unknown}; its options: {allowed or 'none'}")
