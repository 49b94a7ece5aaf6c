"""Protocols as code: few-shot, base-to-novel, cross-dataset, domain generalisation, multi-task.

Each protocol turns (recipe, seed, shots) into independent *units*; a unit trains one head and
evaluates it. Every finished unit is written atomically to `OUT/runs/<recipe>/<unit>.json` with
the configuration that produced it (`Recipe.unit_config`), so an interrupted `clipheads bench
protocol` resumes where it stopped and never re-runs a finished unit, while a rerun with other
settings into the same folder is refused (`StaleResultsError`) instead of passing old units off as
new ones; `recompute=True` moves the stale files to `OUT/runs/<recipe>/stale/` and runs again.
The key holds the backbone's weights sha256 (the same path with other weights is another
configuration), the method's code revision and the data's identity (`data_identity`).
"""
from __future__ import annotations

import hashlib
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
from .recipes import DatasetRef, Recipe, RecipeError


class StaleResultsError(RecipeError):
    """The output folder holds results of another configuration of the same recipe."""


@dataclass(frozen=True)
class Unit:
    """One train+evaluate job of a protocol."""

    key: str  # file-safe, unique within the recipe
    seed: int
    shots: int
    run: Callable[["RunContext"], dict]
    dataset: Optional[DatasetRef] = None  # the one dataset the unit trains and tests on (None: several)


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

    def settings(self, ref: Optional[DatasetRef], shots: int) -> tuple[dict, TrainConfig]:
        """(method config, TrainConfig) of a unit on `ref` (None: several datasets) with K=`shots`."""
        method_config, train = self.recipe.settings(ref, shots)
        return method_config, TrainConfig(**train)

    def train_config(self, seed: int, train: Optional[TrainConfig] = None) -> TrainConfig:
        base = train if train is not None else TrainConfig(**dict(self.recipe.train))
        return replace(base, seed=seed, device=self.device, progress=self.progress)

    def eval_samples(self, ref: DatasetRef, splits: DatasetSplits):
        """What a unit is scored on: `splits.test`, or with `eval_split="val"` the dataset's
        full validation split (relabelled like `splits` when `splits` is a class subset)."""
        if self.recipe.eval_split == "test":
            return splits.test
        full = self.dataset(ref).val
        labels = splits.meta.get("original_labels")
        if labels is None:
            return full
        relabel = {old: new for new, old in enumerate(labels)}
        return tuple(replace(s, label=relabel[s.label]) for s in full if s.label in relabel)


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


def _fit(ctx: RunContext, tasks: list[TaskSpec], train_sets: dict[int, tuple], seed: int,
         ref: Optional[DatasetRef], shots: int):
    """Build the recipe's head for `tasks` with the unit's settings; train it unless the method
    has nothing to train."""
    from ..loop import seed_everything

    method_config, train = ctx.settings(ref, shots)
    seed_everything(seed)  # the init is the unit's own: not what earlier units left in the RNG
    head = build_method(ctx.recipe.method, ctx.backbone, tasks, method_config)
    info = {"trainable_parameters": head.num_trainable(), "train_time_s": 0.0}
    if head.num_trainable() > 0:
        res = train_head(head, train_sets, ctx.train_config(seed, train))
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
                    head, info = _fit(ctx, [task], {0: ds.train}, seed, ref, shots)
                    return {"dataset": ref.label, "top1": _acc(ctx, head, ctx.eval_samples(ref, ds)), **info}

                yield Unit(f"{ref.label}_k{shots}_s{seed}", seed, shots, run, ref)


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
                head, info = _fit(ctx, [task], {0: base.train}, seed, ref, shots)
                b = _acc(ctx, head, ctx.eval_samples(ref, base), classnames=base.classnames)
                n = _acc(ctx, head, ctx.eval_samples(ref, novel), classnames=novel.classnames)
                return {"dataset": ref.label, "base": b, "novel": n, "hm": harmonic_mean(b, n), **info}

            yield Unit(f"{ref.label}_s{seed}", seed, shots, run, ref)


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
            head, info = _fit(ctx, [task], {0: ds.train}, seed, src, shots)
            out = {"source": src.label, "source_top1": _acc(ctx, head, ctx.eval_samples(src, ds)), "targets": {}}
            for ref in targets:
                t = ctx.dataset(ref)
                scorer = head
                if head.num_trainable() == 0:  # zero-shot: each target with its own templates
                    scorer, _ = _fit(ctx, [TaskSpec(ref.label, t.classnames, t.templates)], {}, seed, ref, shots)
                out["targets"][ref.label] = _acc(ctx, scorer, ctx.eval_samples(ref, t), classnames=t.classnames)
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
                tasks, grouping = _group_tasks(ctx, tasks, splits, seed, shots)
            head, info = _fit(ctx, tasks, {i: s.train for i, s in enumerate(splits)}, seed, None, shots)
            per_task = {t.name: _acc(ctx, head, ctx.eval_samples(r, s), task=i)
                        for i, (r, t, s) in enumerate(zip(refs, tasks, splits))}
            out = {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task), **info}
            if grouping is not None:
                out["grouping"] = grouping
            return out

        yield Unit(f"mt_s{seed}", seed, shots, run)


def _group_tasks(ctx: RunContext, tasks, splits, seed, shots):
    """Decide task groups from per-task gradients of one shared warm-up prompt (MmAP), then
    hand each task its group. The decision is recorded with the unit's result."""
    from ..data.loading import make_loader
    from ..grouping import assign_groups, group_tasks, warmup_steps

    cfg, train = ctx.settings(None, shots)
    batches = [make_loader(s.train, ctx.backbone.preprocess, True, train.batch_size, seed=seed + i,
                           crop_scale=tuple(train.crop_scale)) for i, s in enumerate(splits)]
    steps = warmup_steps(cfg.get("grouping_steps"), [len(b) for b in batches])
    report = group_tasks(ctx.backbone, tasks, batches, steps, n_groups=cfg.get("n_groups"), method=ctx.recipe.method,
                         config=cfg, lr=train.lr, seed=seed)
    return list(assign_groups(tasks, report.groups)), report.to_dict()


def _backbone_spec(backbone: Backbone) -> dict:
    return {"arch": backbone.arch, "pretrained": backbone.pretrained, "weights_sha256": backbone.weights_sha256}


DATA_FINGERPRINT_FILE = "world.json"  # a synthetic world's seed and size (`clipheads data synth`)


def data_identity(data_root: str | os.PathLike) -> tuple[str, Optional[str]]:
    """(data root as the resume key holds it, fingerprint). The root is made absolute and written
    relative to the working directory when it lies below it (`runs/world-s1` in any checkout),
    absolute otherwise. The fingerprint is the sha256 of the root's `world.json` when it has one:
    a world regenerated at the same path with another seed or size is other data."""
    path = Path(os.path.abspath(Path(data_root).expanduser()))  # links kept: a checkout may link its data
    try:
        key = str(path.relative_to(Path(os.path.abspath(os.getcwd()))))
    except ValueError:
        key = str(path)
    marker = path / DATA_FINGERPRINT_FILE
    return key, hashlib.sha256(marker.read_bytes()).hexdigest() if marker.is_file() else None


def _config_diff(old: Optional[dict], new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ (for the refusal message)."""
    if not isinstance(old, dict):
        return [prefix.rstrip(".") or "configuration"]
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _expected_config(recipe: Recipe, old: Optional[dict], res: dict, data: tuple[str, Optional[str]],
                     bb_spec: dict) -> Optional[dict]:
    """What a result file outside the current plan (e.g. a seed not asked for now) should hold:
    the recipe's configuration for that file's dataset, seed and shots."""
    if not isinstance(old, dict) or "seed" not in res or "shots" not in res:
        return None
    ref = None
    if recipe.protocol in ("few_shot", "base_to_novel"):  # per-dataset units
        label = DatasetRef.from_json(old["datasets"][0]).label if old.get("datasets") else None
        ref = next((r for r in recipe.datasets if r.label == label), None)
        if ref is None:
            return None  # the dataset left the recipe
    return _jsonable({**recipe.unit_config(data[0], res["seed"], res["shots"], ref, data[1]), "backbone": bb_spec})


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))  # as a result file holds it (tuples -> lists)


def check_finished_units(recipe: Recipe, run_dir: Path, units: list[Unit], configs: dict[str, dict],
                         data: tuple[str, Optional[str]], bb_spec: dict, recompute: bool,
                         log: Callable[[str], None]) -> None:
    """Every result file in `run_dir` must come from the recipe's current configuration (files of
    seeds or datasets not run now count too, since the report reads them). Otherwise refuse, or
    with `recompute` move them to `run_dir/stale/<time>/`, so nothing is lost."""
    planned = {u.key: u for u in units}
    stale = []
    for path in sorted(run_dir.glob("*.json")):
        if path.name == "recipe.json":
            continue
        res = json.loads(path.read_text())
        old = res.get("config")
        unit = planned.get(path.stem)
        want = configs[unit.key] if unit is not None else _expected_config(recipe, old, res, data, bb_spec)
        if old != want:
            stale.append((path, _config_diff(old, want) if want is not None else
                          ["no recorded configuration, or a dataset the recipe no longer has"]))
    if not stale:
        return
    if not recompute:
        first, diff = stale[0]
        detail = "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
        raise StaleResultsError(
            f"{run_dir} holds {len(stale)} result(s) of another configuration of {recipe.name!r} "
            f"(e.g. {first.name}: {detail or 'no recorded configuration'}); use another --out, or --recompute "
            "to move them to stale/ and run again")
    dest = run_dir / "stale" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path, _ in stale:
        path.replace(dest / path.name)
    log(f"[{recipe.name}] moved {len(stale)} result(s) of another configuration to {dest}")


def run_recipe(
    recipe: Recipe,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    recompute: bool = False,
) -> list[dict]:
    """Run (or resume) every unit of `recipe`; returns all unit results, finished ones included.
    Finished units of another configuration raise StaleResultsError (see the module docstring)."""
    if recipe.protocol not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {recipe.protocol!r}; known: {', '.join(list_protocols())}")
    run_dir = Path(out_dir) / "runs" / recipe.name
    units = list(_PROTOCOLS[recipe.protocol](recipe))
    data = data_identity(data_root)
    # loaded before the check, even when every unit is done: the key holds the weights' sha256
    bb = backbone or load_backbone(recipe.backbone.get("arch", "clipheads-tiny"), recipe.backbone.get("pretrained"), device=device)
    bb_spec = _backbone_spec(bb)
    configs = {u.key: _jsonable({**recipe.unit_config(data[0], u.seed, u.shots, u.dataset, data[1]), "backbone": bb_spec})
               for u in units}
    run_dir.mkdir(parents=True, exist_ok=True)
    check_finished_units(recipe, run_dir, units, configs, data, bb_spec, recompute, log)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=2))
    ctx = None
    results = []
    for i, unit in enumerate(units, 1):
        path = run_dir / f"{unit.key}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            log(f"[{recipe.name} {i}/{len(units)}] {unit.key}: done earlier, kept")
            continue
        if ctx is None:
            ctx = RunContext(recipe, Path(data_root), bb, device=device, progress=progress)
        start = time.perf_counter()
        res = {"recipe": recipe.name, "method": recipe.method, "protocol": recipe.protocol, "unit": unit.key,
               "seed": unit.seed, "shots": unit.shots, **unit.run(ctx)}
        res["wall_time_s"] = round(time.perf_counter() - start, 2)
        res["config"] = configs[unit.key]
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
