"""Protocols as code: few-shot, base-to-novel, cross-dataset, domain generalisation, multi-task.

Each protocol turns (recipe, seed, shots) into independent *units*; a unit trains one head and
evaluates it. Every finished unit is written atomically to `OUT/runs/<recipe>/<unit>.json`, so an
interrupted `clipheads bench protocol` resumes where it stopped and never re-runs a finished unit.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..backbone import Backbone, load_backbone
from ..data.records import DatasetSplits
from ..loop import TrainConfig, evaluate, train_head
from ..methods import TaskSpec, build_method
from .recipes import DatasetRef, Recipe


@dataclass(frozen=True)
class Unit:
    """One train+evaluate job of a protocol."""

    key: str  # file-safe, unique within the recipe
    seed: int
    shots: int
    run: Callable[["RunContext"], dict]


@dataclass
class RunContext:
    recipe: Recipe
    data_root: Path
    backbone: Backbone
    device: str = "cpu"
    progress: bool = True
    _cache: Optional[dict] = None

    def dataset(self, ref: DatasetRef) -> DatasetSplits:
        from ..data.readers import read_dataset

        self._cache = self._cache if self._cache is not None else {}
        key = (ref.reader, ref.path, tuple(sorted(ref.kwargs.items())))
        if key not in self._cache:
            self._cache[key] = read_dataset(ref.reader, str(self.data_root / ref.path), **dict(ref.kwargs))
        return self._cache[key]

    def train_config(self, seed: int) -> TrainConfig:
        return replace(TrainConfig(**dict(self.recipe.train)), seed=seed, device=self.device, progress=self.progress)


_PROTOCOLS: dict[str, Callable[[Recipe], Iterator[Unit]]] = {}


def register_protocol(name: str):
    def deco(fn):
        if name in _PROTOCOLS:
            raise ValueError(f"protocol {name!r} registered twice")
        _PROTOCOLS[name] = fn
        return fn

    return deco


def list_protocols() -> list[str]:
    return sorted(_PROTOCOLS)


def _fit(ctx: RunContext, tasks: list[TaskSpec], train_sets: dict[int, tuple], seed: int):
    """Build the recipe's head for `tasks`; train it unless the method has nothing to train."""
    head = build_method(ctx.recipe.method, ctx.backbone, tasks, ctx.recipe.method_config)
    info = {"trainable_parameters": head.num_trainable(), "train_time_s": 0.0}
    if head.num_trainable() > 0:
        res = train_head(head, train_sets, ctx.train_config(seed))
        info.update(train_time_s=round(res.wall_time_s, 2), final_loss=res.final_loss, first_loss=res.first_loss)
    return head, info


def _few(ds: DatasetSplits, shots: int, seed: int) -> DatasetSplits:
    from ..data.fewshot import few_shot_splits

    return few_shot_splits(ds, shots, seed) if shots > 0 else ds


def _acc(ctx: RunContext, head, samples, task: int = 0, classnames=None) -> float:
    return evaluate(head, samples, task=task, classnames=classnames, batch_size=ctx.recipe.eval_batch_size, device=ctx.device)["top1"]


def _train_refs(recipe: Recipe) -> list[DatasetRef]:
    return [r for r in recipe.datasets if r.role == "train"]


@register_protocol("few_shot")
def few_shot_units(recipe: Recipe) -> Iterator[Unit]:
    """Train on K shots per class, test on the full test split (all classes)."""
    for ref in _train_refs(recipe):
        for shots in recipe.shots:
            for seed in recipe.seeds:
                def run(ctx, ref=ref, shots=shots, seed=seed):
                    ds = _few(ctx.dataset(ref), shots, seed)
                    task = TaskSpec(ref.label, ds.classnames, ds.templates)
                    head, info = _fit(ctx, [task], {0: ds.train}, seed)
                    return {"dataset": ref.label, "top1": _acc(ctx, head, ds.test), **info}

                yield Unit(f"{ref.label}_k{shots}_s{seed}", seed, shots, run)


@register_protocol("base_to_novel")
def base_to_novel_units(recipe: Recipe) -> Iterator[Unit]:
    """Few-shot on all classes first, then split labels (ceil rule); train on base; test base
    classes with base names and novel classes with novel names; HM = 2BN/(B+N)."""
    from .splits import base_novel_split, harmonic_mean

    shots = recipe.shots[0]
    for ref in _train_refs(recipe):
        for seed in recipe.seeds:
            def run(ctx, ref=ref, seed=seed):
                base, novel = base_novel_split(_few(ctx.dataset(ref), shots, seed))
                task = TaskSpec(ref.label, base.classnames, base.templates)
                head, info = _fit(ctx, [task], {0: base.train}, seed)
                b = _acc(ctx, head, base.test, classnames=base.classnames)
                n = _acc(ctx, head, novel.test, classnames=novel.classnames)
                return {"dataset": ref.label, "base": b, "novel": n, "hm": harmonic_mean(b, n), **info}

            yield Unit(f"{ref.label}_s{seed}", seed, shots, run)


@register_protocol("cross_dataset")
def transfer_units(recipe: Recipe) -> Iterator[Unit]:
    """Train on the source dataset (role "train"); evaluate on each target (role "target") with
    the target's own class names. Domain generalisation is the same computation."""
    shots = recipe.shots[0]
    sources = _train_refs(recipe)
    targets = [r for r in recipe.datasets if r.role == "target"]
    if len(sources) != 1:
        raise ValueError(f"{recipe.name}: transfer protocols need exactly one source dataset")
    src = sources[0]
    for seed in recipe.seeds:
        def run(ctx, seed=seed):
            ds = _few(ctx.dataset(src), shots, seed)
            task = TaskSpec(src.label, ds.classnames, ds.templates)
            head, info = _fit(ctx, [task], {0: ds.train}, seed)
            out = {"source": src.label, "source_top1": _acc(ctx, head, ds.test), "targets": {}}
            for ref in targets:
                t = ctx.dataset(ref)
                out["targets"][ref.label] = _acc(ctx, head, t.test, classnames=t.classnames)
            out["mean_targets"] = sum(out["targets"].values()) / max(len(out["targets"]), 1)
            return {**out, **info}

        yield Unit(f"{src.label}_s{seed}", seed, shots, run)


register_protocol("domain_generalization")(transfer_units)


@register_protocol("multi_task")
def multi_task_units(recipe: Recipe) -> Iterator[Unit]:
    """Each dataset (domain) is a task of one head; report per-task top-1 and their mean.
    Methods with task groups (MmAP) get the gradient-driven grouping decided first."""
    shots = recipe.shots[0]
    refs = _train_refs(recipe)
    for seed in recipe.seeds:
        def run(ctx, seed=seed):
            splits = [_few(ctx.dataset(r), shots, seed) for r in refs]
            tasks = [TaskSpec(r.label, s.classnames, s.templates) for r, s in zip(refs, splits)]
            grouping = None
            if recipe.method == "mmap":
                tasks, grouping = _group_tasks(ctx, tasks, splits, seed)
            head, info = _fit(ctx, tasks, {i: s.train for i, s in enumerate(splits)}, seed)
            per_task = {t.name: _acc(ctx, head, s.test, task=i) for i, (t, s) in enumerate(zip(tasks, splits))}
            out = {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task), **info}
            if grouping is not None:
                out["grouping"] = grouping
            return out

        yield Unit(f"mt_s{seed}", seed, shots, run)


def _group_tasks(ctx: RunContext, tasks, splits, seed):
    """Decide task groups from per-task gradients of one shared warm-up prompt (MmAP), then
    hand each task its group. The decision is recorded with the unit's result."""
    from ..data.loading import make_loader
    from ..grouping import assign_groups, group_tasks

    cfg = dict(ctx.recipe.method_config)
    train = ctx.train_config(seed)
    batches = [make_loader(s.train, ctx.backbone.preprocess, True, train.batch_size, seed=seed + i,
                           crop_scale=tuple(train.crop_scale)) for i, s in enumerate(splits)]
    steps = max(5, min(50, 2 * min(len(b) for b in batches)))  # a short warm-up: two passes of the smallest task
    report = group_tasks(ctx.backbone, tasks, batches, steps, n_groups=cfg.get("n_groups"), method=ctx.recipe.method,
                         config=cfg, lr=train.lr, seed=seed)
    return list(assign_groups(tasks, report.groups)), report.to_dict()


def run_recipe(
    recipe: Recipe,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run (or resume) every unit of `recipe`; returns all unit results, finished ones included."""
    if recipe.protocol not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {recipe.protocol!r}; known: {', '.join(list_protocols())}")
    run_dir = Path(out_dir) / "runs" / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=2))
    units = list(_PROTOCOLS[recipe.protocol](recipe))
    ctx = None
    results = []
    for i, unit in enumerate(units, 1):
        path = run_dir / f"{unit.key}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            log(f"[{recipe.name} {i}/{len(units)}] {unit.key}: done earlier, kept")
            continue
        if ctx is None:
            bb = backbone or load_backbone(recipe.backbone.get("arch", "clipheads-tiny"), recipe.backbone.get("pretrained"), device=device)
            ctx = RunContext(recipe, Path(data_root), bb, device=device, progress=progress)
        start = time.perf_counter()
        res = {"recipe": recipe.name, "method": recipe.method, "protocol": recipe.protocol, "unit": unit.key,
               "seed": unit.seed, "shots": unit.shots, **unit.run(ctx)}
        res["wall_time_s"] = round(time.perf_counter() - start, 2)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(path)  # atomic: a killed run never leaves a half-written result
        results.append(res)
        log(f"[{recipe.name} {i}/{len(units)}] {unit.key}: {_one_line(res)}")
    return results


def _one_line(res: dict) -> str:
    for keys in (("base", "novel", "hm"), ("mean",), ("mean_targets",), ("top1",)):
        if all(k in res for k in keys):
            return ", ".join(f"{k} {res[k]:.1%}" for k in keys) + f" ({res['wall_time_s']}s)"
    return json.dumps(res)[:120]
