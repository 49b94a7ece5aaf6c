"""Recipes: one small JSON file per (method, protocol) with the papers' hyper-parameters.

A recipe is data, not code (STYLE.md 1). It names a method and its config, the shared
TrainConfig fields, a protocol and the datasets the protocol runs on. Dataset entries name a
registered reader and a path relative to `--data-root`:

    {"name": "maple_base2novel", "method": "maple", "protocol": "base_to_novel",
     "method_config": {"depth": 9}, "train": {"epochs": 5, "batch_size": 4, "lr": 0.0035},
     "shots": [16], "seeds": [1, 2, 3],
     "datasets": [{"reader": "oxford_pets", "path": "."}]}
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetRef:
    reader: str
    path: str = "."
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    role: str = "train"  # train | target (cross-dataset / DG targets are evaluated only)
    name: Optional[str] = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        extra = "-".join(str(v) for v in self.kwargs.values())
        return f"{self.reader}-{extra}" if extra else self.reader

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DatasetRef":
        d = dict(d)
        known = {"reader", "path", "role", "name"}
        kwargs = {k: v for k, v in d.items() if k not in known}
        return cls(d["reader"], d.get("path", "."), kwargs, d.get("role", "train"), d.get("name"))


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str
    protocol: str
    datasets: tuple[DatasetRef, ...]
    method_config: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    shots: tuple[int, ...] = (16,)
    seeds: tuple[int, ...] = (1, 2, 3)
    description: str = ""
    papers: Mapping[str, Any] = field(default_factory=dict)  # published numbers for this protocol
    eval_batch_size: int = 100
    backbone: Mapping[str, Any] = field(default_factory=dict)  # {"arch": ..., "pretrained": ...}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Recipe":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecipeError(f"{source}: unknown recipe keys {unknown}; known: {sorted(names)}")
        try:
            return cls(
                name=d["name"],
                method=d["method"],
                protocol=d["protocol"],
                datasets=tuple(DatasetRef.from_json(x) for x in d["datasets"]),
                method_config=dict(d.get("method_config", {})),
                train=dict(d.get("train", {})),
                shots=tuple(d.get("shots", (16,))),
                seeds=tuple(d.get("seeds", (1, 2, 3))),
                description=d.get("description", ""),
                papers=dict(d.get("papers", {})),
                eval_batch_size=int(d.get("eval_batch_size", 100)),
                backbone=dict(d.get("backbone", {})),
            )
        except KeyError as err:
            raise RecipeError(f"{source}: recipe misses {err}") from None

    def to_json(self) -> dict:
        return {
            "name": self.name, "method": self.method, "protocol": self.protocol,
            "datasets": [{"reader": r.reader, "path": r.path, "role": r.role, **({"name": r.name} if r.name else {}), **r.kwargs} for r in self.datasets],
            "method_config": dict(self.method_config), "train": dict(self.train),
            "shots": list(self.shots), "seeds": list(self.seeds), "description": self.description,
            "papers": dict(self.papers), "eval_batch_size": self.eval_batch_size,
            "backbone": dict(self.backbone),
        }


def load_recipe(ref: str) -> Recipe:
    """A recipe file path, or the name of a packaged recipe (see `list_recipes()`)."""
    path = Path(ref)
    if not path.is_file():
        path = RECIPE_DIR / (ref if ref.endswith(".json") else f"{ref}.json")
    if not path.is_file():
        raise RecipeError(f"no recipe {ref!r}; packaged recipes: {', '.join(list_recipes())}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: not valid JSON: {err}") from None
    return Recipe.from_json(data, str(path))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def expand_recipe_refs(refs: list[str]) -> list[str]:
    """Shell-style patterns over packaged names (`'synth_*'`) expand in sorted order; files and
    plain names pass through (an unmatched pattern is kept, so load_recipe names the problem)."""
    out: list[str] = []
    for ref in refs:
        if any(c in ref for c in "*?[") and not Path(ref).is_file():
            out += fnmatch.filter(list_recipes(), ref) or [ref]
        else:
            out.append(ref)
    return out
