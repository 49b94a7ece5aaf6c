"""Recipes against the official configurations they mirror (issue 14.3).

Two committed files in `training/recipes/official/`:

* `mirrors.json` (hand-written): per recipe, the official config file(s) it mirrors - one per
  condition, e.g. CoOp's `vit_b16_ep50.yaml` for 1 shot and for ImageNet - the run-script options
  the official scripts add, and every field where the recipe knowingly differs, with the reason.
* `configs.json` (written by `bench/official_configs/extract.py` from the fetched repositories,
  repo@commit recorded): each mirrored config merged over its trainer's and Dassl's defaults and
  translated into our field names (TrainConfig, method config, eval batch size).

`recipe_fidelity(recipe)` compares, for every unit condition of the recipe (each training dataset
x each shot count), the recipe's effective settings (`Recipe.settings` over the dataclass
defaults) with the official values. `check_recipe(recipe)` returns what does not match the
committed reasons: a difference without a reason, or a reason for a field that no longer differs.
tests/test_recipes_fidelity.py fails on either, so a recipe cannot drift silently.
"""
from __future__ import annotations

import json
from dataclasses import fields
from functools import lru_cache
from typing import Any, Optional

from .recipes import RECIPE_DIR, DatasetRef, Override, Recipe

OFFICIAL_DIR = RECIPE_DIR / "official"
NOT_LISTED = "not in mirrors.json"


@lru_cache(maxsize=1)
def _load(name: str) -> dict:
    return json.loads((OFFICIAL_DIR / name).read_text())


def mirrors() -> dict:
    return _load("mirrors.json")


def official_configs() -> dict:
    return _load("configs.json")


def _ours(recipe: Recipe, ref: Optional[DatasetRef], shots: int) -> dict:
    """The recipe's effective values in the vocabulary of configs.json."""
    from ..loop import TrainConfig
    from ..methods import get_method

    method_config, train = recipe.settings(ref, shots)
    tc = TrainConfig(**train)
    out = {f"train.{f.name}": getattr(tc, f.name) for f in fields(TrainConfig)}
    out["train.crop_scale"] = list(tc.crop_scale)
    out["train.lr_scheduler"] = "cosine"  # the one schedule of training/loop.py
    mc = get_method(recipe.method).Config.from_dict(method_config).to_dict()
    if recipe.method == "mma" and mc.get("blocks") is None:  # the default on 12-layer towers
        from ..methods.mma import default_adapter_blocks

        mc["blocks"] = list(default_adapter_blocks(12))
    out.update({f"method.{k}": v for k, v in mc.items()})
    out["eval_batch_size"] = recipe.eval_batch_size
    out["backbone"] = recipe.backbone.get("arch")
    return out


def _conditions(recipe: Recipe) -> list[tuple[Optional[DatasetRef], int]]:
    if recipe.protocol == "multi_task":
        return [(None, k) for k in recipe.shots]
    refs = [r for r in recipe.datasets if r.role == "train"]
    shots = recipe.shots if recipe.protocol == "few_shot" else recipe.shots[:1]
    return [(r, k) for r in refs for k in shots]


def _mirror_for(entry: dict, ref: Optional[DatasetRef], shots: int) -> Optional[dict]:
    """The last mirror whose `when` matches (later entries win, as recipe overrides do)."""
    found = None
    for m in entry.get("mirrors", []):
        cond = Override.from_json({"when": m.get("when", {}), "train": {"_": 0}}, "mirrors.json")
        if cond.matches(ref, shots):
            found = m
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def recipe_fidelity(recipe: Recipe) -> dict:
    """{"recipe", "mirrors": [{config, source, when}], "differences": {field: [{ours, official,
    conditions}]}, "reasons": {field: reason}, "official": bool}."""
    import fnmatch

    entry = mirrors()["recipes"].get(recipe.name)
    if entry is None:
        note = next((why for pat, why in mirrors()["unofficial"].items() if fnmatch.fnmatch(recipe.name, pat)), None)
        return {"recipe": recipe.name, "official": False, "mirrors": [], "differences": {}, "reasons": {},
                "note": note or NOT_LISTED}
    configs = official_configs()["configs"]
    diffs: dict[str, dict] = {}
    used = []
    for ref, shots in _conditions(recipe):
        m = _mirror_for(entry, ref, shots)
        if m is None:
            continue
        cid = m["config"]
        if cid not in used:
            used.append(cid)
        official = configs[cid]["values"]
        ours = _ours(recipe, ref, shots)
        where = (ref.label if ref else "all tasks") + f" K={shots}"
        for key, want in official.items():
            have = ours.get(key, "<absent>")
            if not _same(have, want):
                cell = diffs.setdefault(key, {})
                cell.setdefault(json.dumps([have, want]), {"ours": have, "official": want, "conditions": []})["conditions"].append(where)
    return {
        "recipe": recipe.name,
        "official": bool(entry.get("mirrors")),
        "mirrors": [{"config": c, "source": configs[c]["source"]} for c in used],
        "note": entry.get("note", ""),
        "differences": {k: list(v.values()) for k, v in sorted(diffs.items())},
        "reasons": dict(entry.get("differences", {})),
    }


def check_recipe(recipe: Recipe) -> list[str]:
    """Problems: differences without a committed reason, reasons for fields that do not differ."""
    f = recipe_fidelity(recipe)
    if f.get("note") == NOT_LISTED:
        return [f"{recipe.name}: not listed in training/recipes/official/mirrors.json"]
    problems = [f"{recipe.name}: {k} differs from the official config ({v[0]['ours']!r} vs {v[0]['official']!r}, "
                f"{', '.join(v[0]['conditions'][:3])}) with no reason in mirrors.json"
                for k, v in f["differences"].items() if k not in f["reasons"]]
    problems += [f"{recipe.name}: mirrors.json gives a reason for {k}, which no longer differs"
                 for k in f["reasons"] if k not in f["differences"]]
    return problems


def fidelity_rows(recipes: list[Recipe]) -> list[dict]:
    return [recipe_fidelity(r) for r in recipes]


def render_fidelity_markdown(recipes: list[Recipe]) -> str:
    """The compact README table: recipe, official config file(s), each differing field (ours vs
    official) with its reason; a reason shared by several rows becomes a numbered note."""
    repos = official_configs()["repos"]
    rows = fidelity_rows(recipes)
    counts: dict[str, int] = {}
    for f in rows:
        for k in f["differences"]:
            why = f["reasons"].get(k, "NO REASON")
            counts[why] = counts.get(why, 0) + 1
    notes = [why for why, n in counts.items() if n > 1]
    table: dict[tuple[str, str], list[str]] = {}  # rows with the same content share one line
    for f in rows:
        if not f["official"]:
            table.setdefault(("–", f["note"]), []).append(f["recipe"])
            continue
        files = []
        for c in f["mirrors"]:
            name = "/".join(c["source"].split(":", 1)[1].split(" + ")[0].split("/")[-2:])  # trainer/file.yaml
            if name not in files:
                files.append(name)
        cells = []
        for k, vals in f["differences"].items():
            pairs = "; ".join(f"{_short(v['ours'])} vs {_short(v['official'])}" for v in vals)
            why = f["reasons"].get(k, "NO REASON")
            ref = f"[{notes.index(why) + 1}]" if why in notes else f": {why}"
            cells.append(f"{k.split('.', 1)[-1]} {pairs}{ref}")
        table.setdefault((", ".join(f"`{n}`" for n in files), "<br>".join(cells) or "none"), []).append(f["recipe"])
    lines = ["| recipe | mirrors (official config) | differs (ours vs official) |", "|---|---|---|"]
    lines += [f"| {', '.join(f'`{n}`' for n in names)} | {cfg} | {diff} |" for (cfg, diff), names in table.items()]
    lines.append("")
    lines += [f"[{i}] {why}" + "  " for i, why in enumerate(notes, 1)]
    lines.append("Official repositories (configs read at): " + ", ".join(f"{v}" for _, v in sorted(repos.items())) + ".")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, list) and len(v) > 4:
        return f"[{v[0]}..{v[-1]}]"
    return json.dumps(v)
