"""Recipes: one small JSON file per (method, protocol) with the papers' hyper-parameters.

A recipe is data, not code (STYLE.md 1). It names a method and its config, the shared
TrainConfig fields, a protocol and the datasets the protocol runs on. Dataset entries name a
registered reader and a path relative to `--data-root`:

    {"name": "maple_base2novel", "method": "maple", "protocol": "base_to_novel",
     "method_config": {"depth": 9}, "train": {"epochs": 5, "batch_size": 4, "lr": 0.0035},
     "shots": [16], "seeds": [1, 2, 3],
     "datasets": [{"reader": "oxford_pets", "path": "."}],
     "overrides": [{"when": {"dataset": ["imagenet"]}, "train": {"batch_size": 128},
                    "reason": "vit_b16_ep5_imnet.yaml"}]}

`overrides` express the official configs that change per dataset or per shot count (CoOp's
epochs by K, ImageNet's own YAMLs): each entry whose `when` matches a unit (dataset = the
dataset's label or reader name; shots = K) updates `train` / `method_config`, in file order, so
a later entry wins. `Recipe.settings(dataset, shots)` is the merged result a unit trains with.
`eval_split` is "test" (the papers' protocols) or "val" (model selection: every unit is scored
on the dataset's full validation split, never on test).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


EVAL_SPLITS = ("test", "val")


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Override:
    """Settings for the units a condition selects (`None`: any dataset / any shot count)."""

    datasets: Optional[tuple[str, ...]] = None
    shots: Optional[tuple[int, ...]] = None
    train: Mapping[str, Any] = field(default_factory=dict)
    method_config: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""

    def matches(self, dataset: Optional["DatasetRef"], shots: Optional[int]) -> bool:
        if self.datasets is not None and (dataset is None or not {dataset.label, dataset.reader} & set(self.datasets)):
            return False
        return self.shots is None or shots in self.shots

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str) -> "Override":
        unknown = sorted(set(d) - {"when", "train", "method_config", "reason"})
        when = dict(d.get("when", {}))
        bad_when = sorted(set(when) - {"dataset", "shots"})
        if unknown or bad_when or not (d.get("train") or d.get("method_config")):
            raise RecipeError(f"{source}: an override is {{\"when\": {{\"dataset\": [...], \"shots\": [...]}}, "
                              f"\"train\": {{...}}, \"method_config\": {{...}}, \"reason\": \"...\"}}; got {dict(d)}")
        ds, k = when.get("dataset"), when.get("shots")
        return cls(tuple([ds] if isinstance(ds, str) else ds) if ds is not None else None,
                   tuple([k] if isinstance(k, int) else k) if k is not None else None,
                   dict(d.get("train", {})), dict(d.get("method_config", {})), d.get("reason", ""))

    def to_json(self) -> dict:
        when = {k: list(v) for k, v in (("dataset", self.datasets), ("shots", self.shots)) if v is not None}
        out: dict = {"when": when}
        out.update({k: dict(v) for k, v in (("train", self.train), ("method_config", self.method_config)) if v})
        return {**out, **({"reason": self.reason} if self.reason else {})}


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
    overrides: tuple[Override, ...] = ()
    eval_split: str = "test"

    def settings(self, dataset: Optional[DatasetRef] = None, shots: Optional[int] = None) -> tuple[dict, dict]:
        """(method_config, train) for one unit: the recipe's, updated by every matching override."""
        method_config, train = dict(self.method_config), dict(self.train)
        for o in self.overrides:
            if o.matches(dataset, shots):
                method_config.update(o.method_config)
                train.update(o.train)
        return method_config, train

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Recipe":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecipeError(f"{source}: unknown recipe keys {unknown}; known: {sorted(names)}")
        split = d.get("eval_split", "test")
        if split not in EVAL_SPLITS:
            raise RecipeError(f"{source}: eval_split must be one of {EVAL_SPLITS}, got {split!r}")
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
                overrides=tuple(Override.from_json(o, source) for o in d.get("overrides", ())),
                eval_split=split,
            )
        except KeyError as err:
            raise RecipeError(f"{source}: recipe misses {err}") from None

    def to_json(self) -> dict:
        return {
            "name": self.name, "method": self.method, "protocol": self.protocol,
            "datasets": [_ref_json(r) for r in self.datasets],
            "method_config": dict(self.method_config), "train": dict(self.train),
            "shots": list(self.shots), "seeds": list(self.seeds), "description": self.description,
            "papers": dict(self.papers), "eval_batch_size": self.eval_batch_size,
            "backbone": dict(self.backbone),
            "overrides": [o.to_json() for o in self.overrides], "eval_split": self.eval_split,
        }

    def unit_config(self, data_root: str, seed: int, shots: int, dataset: Optional[DatasetRef] = None,
                    data_fingerprint: Optional[str] = None) -> dict:
        """Everything that decides one unit's result (its resume key), as effective values: the
        method and train settings after overrides with every default filled in, the method's
        code revision (`revisions.py`), the unit's dataset (None: a unit over all the recipe's
        datasets), seed, shots, evaluation split, data root and data fingerprint (`runner.
        data_identity`). Not the name, description, published numbers or evaluation batch size.
        The backbone (arch, weights, their sha256) is added by the runner."""
        from ..loop import TrainConfig
        from ..methods import get_method
        from .revisions import method_revision

        method_config, train = self.settings(dataset, shots)
        refs = [dataset] if dataset is not None else list(self.datasets)
        return {
            "method": self.method, "protocol": self.protocol, **method_revision(self.method),
            "method_config": get_method(self.method).Config.from_dict(method_config).to_dict(),
            "train": {k: list(v) if isinstance(v, tuple) else v for k, v in TrainConfig(**train).to_dict().items()
                      if k not in ("device", "progress")},
            "datasets": [_ref_json(r) for r in refs], "eval_split": self.eval_split,
            "data_root": str(data_root), "data_fingerprint": data_fingerprint, "seed": seed, "shots": shots,
        }


def _ref_json(r: DatasetRef) -> dict:
    return {"reader": r.reader, "path": r.path, "role": r.role, **({"name": r.name} if r.name else {}), **r.kwargs}


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
    """Names of the packaged recipes (`clipheads bench list`), e.g. "coop_base2novel"."""
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
