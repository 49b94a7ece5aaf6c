"""Train and evaluate heads from data specs: the library behind `clipheads train` and `clipheads
eval`, and what `clipheads.train(...)` / `clipheads.evaluate(...)` are.

Settings merge in one documented order, then freeze (STYLE.md 7):

    TrainConfig / method-config defaults -> the recipe (the method's packaged default recipe for
    this backbone, or the one you name) -> your overrides (`config=`, TrainConfig keywords)

`default_recipe(method, arch)` picks the packaged recipe a plain `train --method M` uses: M's
recipe for this backbone (the `synth_*` recipes for the packaged tiny CLIP, whose learning rates
were chosen on its validation split; the papers' ViT-B/16 recipes for every other backbone),
preferring the base-to-novel protocol (the papers' general few-shot settings), then few-shot.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

from .data.records import DatasetSplits

if TYPE_CHECKING:
    from .methods import TaskSpec

DataArg = Union[str, Path, DatasetSplits, Sequence[Union[str, Path]], Mapping[str, Union[str, Path, DatasetSplits]]]
PROTOCOL_PREFERENCE = ("base_to_novel", "few_shot", "multi_task", "cross_dataset", "domain_generalization")
PAPER_ARCH = "ViT-B-16"


class EvaluationRefused(ValueError):
    """The requested split would score images the head was trained on."""


def resolve_device(device: Optional[str] = "auto") -> str:
    """"auto" (or None): CUDA when available, else the CPU; anything else as given, once torch
    knows it and, for CUDA, a device is there (BackboneError otherwise, before any weights load)."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    from .backbone import BackboneError

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise BackboneError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
                            "use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackboneError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(device)


# ---- recipes ---------------------------------------------------------------------------------
def default_recipe(method: str, arch: str):
    """The packaged `Recipe` that `train --method METHOD` starts from on `arch` (see the module
    doc), or None when the method has none."""
    from .backbone import PACKAGED_ARCH
    from .protocols.recipes import list_recipes, load_recipe

    def rank(r) -> tuple[int, int, str]:
        rarch = r.backbone.get("arch")
        arch_rank = 0 if rarch == arch else 1 if rarch == PAPER_ARCH else 2
        proto_rank = PROTOCOL_PREFERENCE.index(r.protocol) if r.protocol in PROTOCOL_PREFERENCE else len(PROTOCOL_PREFERENCE)
        return arch_rank, proto_rank, r.name

    mine = [r for r in map(load_recipe, list_recipes()) if r.method == method]
    if arch != PACKAGED_ARCH:  # the synth_* recipes are tuned for the packaged tiny CLIP only
        mine = [r for r in mine if r.backbone.get("arch") != PACKAGED_ARCH]
    return min(mine, key=rank) if mine else None


def read_recipe(ref: str):
    """A packaged recipe name or a recipe file -> `Recipe`. A file written for training alone
    may hold just {method, method_config, train}: the protocol keys default to empty."""
    from .protocols.recipes import RECIPE_DIR, Recipe, RecipeError, list_recipes, load_recipe

    path = Path(ref).expanduser()
    if not path.is_file():
        if not (RECIPE_DIR / (ref if ref.endswith(".json") else f"{ref}.json")).is_file():
            raise RecipeError(f"no recipe {ref!r} (not a file, not a packaged recipe: {', '.join(list_recipes())})")
        return load_recipe(ref)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"recipe {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a JSON object")
    return Recipe.from_json({"name": path.stem, "protocol": "train", "datasets": [], **data}, str(path))


# ---- data ------------------------------------------------------------------------------------
def absolute_spec(spec: str) -> str:
    """A data spec with its path made absolute (heads record where their data was)."""
    from .data import readers

    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    reader, sep, rest = spec.partition(":")
    if sep and reader in readers.list_readers():
        root, sep2, arg = rest.partition(":")
        if arg and readers.get_reader(reader).spec_arg_is_path:  # e.g. split_json's image root
            arg = str(Path(arg).expanduser().resolve())
        return f"{reader}:{Path(root).expanduser().resolve()}{sep2}{arg}"
    return spec


def resolve_data(data: DataArg) -> dict[str, DatasetSplits]:
    """Specs (a string, a list, {task: spec}) or DatasetSplits -> ordered {task name: splits}."""
    from .data.sources import DataSpecError, resolve_tasks

    if isinstance(data, DatasetSplits):
        return {data.name: data}
    if isinstance(data, (str, Path)):
        data = [data]
    if isinstance(data, Mapping):
        out: dict[str, DatasetSplits] = {}
        for name, spec in data.items():
            if isinstance(spec, DatasetSplits):
                out[name] = spec
            else:
                out.update(resolve_tasks([], [f"{name}={spec}"]))
        if not out:
            raise DataSpecError("no data given")
        return out
    return resolve_tasks([str(d) for d in data])


def _recorded_sources(named: Mapping[str, DatasetSplits]) -> dict[str, str]:
    return {n: absolute_spec(str(s.meta.get("source", s.name))) for n, s in named.items()}


# ---- train -----------------------------------------------------------------------------------
def train(
    method: Optional[str] = None,
    data: DataArg = (),
    *,
    backbone=None,
    pretrained: Optional[str] = None,
    act: Optional[str] = None,
    recipe: Optional[str] = "default",
    config: Optional[Mapping[str, Any]] = None,
    shots: Optional[int] = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    device: Optional[str] = "auto",
    evaluate: bool = True,
    progress: bool = True,
    out: Optional[Union[str, Path]] = None,
    log: Optional[Callable[[str], None]] = None,
    **train_options: Any,
):
    """Train a head and return it (a `HeadMethod`; its record is `head.training_record`).

    Args:
        method: a registered method (`clipheads.list_methods()`); default: the recipe's.
        data: an ImageFolder dir, split_zhou .json, .csv or `READER:ROOT[:ARG]`; a list of them
            (multi-task); `{task: spec}`; or DatasetSplits.
        backbone: a loaded `Backbone`, or an open_clip architecture name (default: the recipe's,
            else the packaged `clipheads-tiny`); `pretrained`: tag | path | hf-hub:ID | none;
            `act`: quickgelu | gelu when the weights do not say (see `load_backbone`).
        recipe: "default" (the method's packaged recipe for this backbone, `default_recipe`),
            a packaged recipe name or JSON file, or None (bare dataclass defaults).
        config: method-config overrides, e.g. `{"n_ctx": 4}`.
        shots: K images per class (Dassl semantics, seeded); None: every image.
        val_fraction / test_fraction: carve held-out splits from unsplit data (seeded).
        train_options: TrainConfig fields (`epochs=`, `lr=`, `batch_size=`, `seed=`, ...).
        out: also save the head there (NAME.head.safetensors).
        log: called with one-line notes (which weights were loaded).

    Example:
        >>> import clipheads
        >>> head = clipheads.train("coop", "photos/", test_fraction=0.2, epochs=5)  # doctest: +SKIP
        >>> head.training_record["metrics"]["test_top1"]                            # doctest: +SKIP
        {'photos': 0.93}
    """
    from .backbone import PACKAGED_ARCH, Backbone, load_backbone
    from .data.fewshot import few_shot_splits
    from .data.holdout import carve
    from .loop import TrainConfig, train_head
    from .methods import TaskSpec, build_method

    if out is not None:
        from .artifact import check_head_path

        check_head_path(out)

    named_recipe = read_recipe(recipe) if recipe not in (None, "default") else None
    method = method or (named_recipe.method if named_recipe else None)
    if not method:
        from .methods.base import MethodError

        raise MethodError("choose a method (see `clipheads methods`) or a recipe that names one")
    if isinstance(backbone, Backbone):
        given = [f"{k}={v!r}" for k, v in (("pretrained", pretrained), ("act", act)) if v is not None]
        if given:  # they choose how a backbone is opened; this one is open already
            raise TypeError(f"{', '.join(given)} applies when `backbone` names an architecture; "
                            f"the loaded Backbone {backbone.arch!r} ({backbone.pretrained}) is used as it is")
        bb = backbone
        arch = bb.arch
    else:
        arch = backbone or (named_recipe.backbone.get("arch") if named_recipe else None) or PACKAGED_ARCH
        bb = None
    chosen = named_recipe if named_recipe is not None else (default_recipe(method, arch) if recipe == "default" else None)
    if chosen is not None and chosen.method != method:
        from .methods.base import MethodError

        raise MethodError(f"recipe {chosen.name!r} is for method {chosen.method!r}, not {method!r}")
    # the recipe's settings after its overrides for this shot count (dataset-specific ones need a
    # dataset the recipe names, so they apply in `clipheads bench`, not here)
    recipe_config, recipe_train = chosen.settings(None, shots) if chosen is not None else ({}, {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train_options) - known)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; TrainConfig has {sorted(known)}")
    typos = sorted(set(recipe_train) - known)
    if typos:
        from .protocols.recipes import RecipeError

        raise RecipeError(f"recipe {chosen.name!r}: unknown train setting(s) {typos}; known: {sorted(known)}")
    device = resolve_device(device)
    tc = TrainConfig(**{**recipe_train, "device": device, "progress": progress})
    tc = replace(tc, **{k: tuple(v) if isinstance(v, list) else v for k, v in train_options.items()})
    method_cfg = {**recipe_config, **dict(config or {})}

    named = resolve_data(data)
    sources = _recorded_sources(named)
    named = {n: carve(s, val_fraction, test_fraction, tc.seed) for n, s in named.items()}
    holdout = {n: s.meta["holdout"] for n, s in named.items() if "holdout" in s.meta}
    if shots:
        named = {n: few_shot_splits(s, shots, tc.seed) for n, s in named.items()}
    tasks = [TaskSpec(n, s.classnames, s.templates) for n, s in named.items()]
    _warn_alike_classes(tasks, log)
    if bb is None:
        rb = chosen.backbone if chosen is not None else {}
        recipe_pretrained = rb.get("pretrained") if rb.get("arch") == arch else None
        bb = load_backbone(arch, pretrained or recipe_pretrained, device=device, act=act)
        if log is not None:
            log(f"backbone: {bb.describe_weights()} [{bb.act_reason}]")
    from .loop import seed_everything

    grouping = _decide_groups(method, bb, tasks, named, method_cfg, tc, log)
    if grouping is not None:
        from .grouping import assign_groups

        tasks = list(assign_groups(tasks, [[grouping["names"].index(n) for n in g] for g in grouping["groups"]]))
    seed_everything(tc.seed)  # the head's random init belongs to the run: one --seed, one head
    head = build_method(method, bb, tasks, method_cfg)
    trained = head.num_trainable() > 0
    if not trained:  # zero-shot: the head is its class names and templates, no tensors
        from .loop import TrainResult

        head.to(device)
        result = TrainResult(head)
    else:
        empty = [n for n, s in named.items() if not s.train]
        if empty:
            from .data.sources import DataSpecError

            raise DataSpecError(f"{method} learns from images: task(s) {', '.join(empty)} have no training images "
                                "(give --data/--task with images; --classes tasks have none)")
        frozen_before = bb.parameters_checksum()
        result = train_head(head, {i: s.train for i, s in enumerate(named.values())}, tc)
        if bb.parameters_checksum() != frozen_before:
            raise RuntimeError("the frozen backbone changed during training: a method leaked a gradient")
    metrics: dict = {}
    head.training_record = _training_record(head, result, tc, trained, chosen, sources, holdout, shots, metrics, grouping)
    if out is None:
        return _evaluated(head, named, metrics, evaluate, device)
    from .artifact import save_head

    # written before the evaluation (a failure there keeps the trained head), again with its scores
    head.training_record["head"] = str(save_head(head, out))
    _evaluated(head, named, metrics, evaluate, device)
    head.training_record["head"] = str(save_head(head, out))
    return head


def _evaluated(head, named: Mapping[str, DatasetSplits], metrics: dict, evaluate: bool, device):
    """`head` with its test top-1 per task in `metrics` (the record's dict), when asked."""
    from .loop import evaluate as evaluate_split

    if evaluate:
        for i, (name, s) in enumerate(named.items()):
            if s.test:
                metrics[name] = evaluate_split(head, s.test, task=i, device=device)["top1"]
    return head


def _training_record(head, result, tc, trained: bool, chosen, sources, holdout, shots, metrics: dict,
                     grouping: Optional[dict]) -> dict:
    return {
        "data": sources,
        "holdout": holdout,
        "shots": shots,
        "seed": tc.seed,
        "trained": trained,
        "epochs": tc.epochs if trained else 0,
        "recipe": chosen.name if chosen is not None else None,
        "defaults": f"recipe {chosen.name}" if chosen is not None else "built-in dataclass defaults",
        "config": {k: v for k, v in tc.to_dict().items() if k != "progress"} if trained else None,
        "metrics": {"test_top1": metrics, **({"final_loss": result.final_loss, "first_loss": result.first_loss}
                                             if result.history else {})},
        "history": result.history,
        "wall_time_s": round(result.wall_time_s, 2),
        "trainable_parameters": head.num_trainable(),
        **({"grouping": grouping} if grouping is not None else {}),
    }


def _decide_groups(method: str, bb, tasks: Sequence["TaskSpec"], named: Mapping[str, DatasetSplits],
                   method_cfg: Mapping[str, Any], tc, log: Optional[Callable[[str], None]]) -> Optional[dict]:
    """The gradient-driven task grouping (MmAP: grouping.py) of methods that group tasks, for
    several tasks with training images and `n_groups` not 1: the report's dict, else None."""
    from .data.loading import make_loader
    from .grouping import group_tasks, warmup_steps
    from .methods import get_method

    cls = get_method(method)
    n_groups = method_cfg.get("n_groups")
    if not getattr(cls, "grouping_parameter", None) or len(tasks) < 2 or n_groups == 1:
        return None
    if any(not s.train for s in named.values()):
        return None  # train() refuses tasks without training images
    batches = [make_loader(s.train, bb.preprocess, True, tc.batch_size, seed=tc.seed + i, crop_scale=tuple(tc.crop_scale))
               for i, s in enumerate(named.values())]
    steps = warmup_steps(method_cfg.get("grouping_steps"), [len(b) for b in batches])
    report = group_tasks(bb, tasks, batches, steps, n_groups=n_groups, method=method, config=method_cfg, lr=tc.lr,
                         seed=tc.seed).to_dict()
    if log is not None:
        log(f"task groups ({report['search']}, {steps} warm-up steps): "
            + " | ".join(", ".join(g) for g in report["groups"]))
    return report


def _warn_alike_classes(tasks: Sequence[TaskSpec], log: Optional[Callable[[str], None]]) -> None:
    """Classes whose names the text tower reads alike ("Cat" and "cat", "a_b" and "a b") start
    from one zero-shot weight: said, not refused (some benchmarks' lists hold such pairs)."""
    from .data.readers import alike_classnames

    for t in tasks:
        pairs = alike_classnames(t.classnames)
        if pairs:
            shown = ", ".join(f"{a!r} ~ {b!r}" for a, b in pairs[:5])
            (log or warnings.warn)(f"warning: task {t.name!r}: {len(pairs)} class pair(s) read the same to the text "
                                   f"encoder (case, '_' and spacing are ignored): {shown}; their prompts are "
                                   "identical, so only learned class-specific parameters can tell them apart")


# ---- open ------------------------------------------------------------------------------------
def open_head(path: Union[str, Path], backbone=None, *, pretrained: Optional[str] = None,
              device: Optional[str] = "auto", log: Optional[Callable[[str], None]] = None):
    """Open a head file and build it on its backbone: a trained `HeadMethod`, ready to evaluate,
    export or wrap in a `Predictor` (`clipheads.load_head`).

    `backbone`: a loaded Backbone to build on (several heads can share one); otherwise the
    recorded one is loaded, with `pretrained` saying where its weights are now (a moved checkpoint;
    sha256-checked against the head's record, `log` is told which file was used).

    Example:
        >>> head = clipheads.load_head("coop-sketch.head.safetensors")  # doctest: +SKIP
        >>> [t.name for t in head.tasks]                                # doctest: +SKIP
        ['sketch']
    """
    from .artifact import load_head

    return load_head(path).build(backbone, device=resolve_device(device), weights_override=pretrained, log=log)


# ---- evaluate --------------------------------------------------------------------------------
def training_images(record: Mapping[str, Any], unreadable: Optional[list[str]] = None) -> set[str]:
    """Real paths of the images a head trained on, rebuilt from its training record: its data
    specs, the holdout it carved and its few-shot draw are all seeded. A source that no longer
    resolves adds nothing and is appended to `unreadable` (a moved or deleted dataset: a copy of
    it elsewhere cannot be recognised)."""
    from .data.fewshot import few_shot_splits
    from .data.holdout import carve
    from .data.sources import resolve_recorded

    paths: set[str] = set()
    if not record.get("trained"):  # zero-shot: no image was trained on
        return paths
    for name, spec in (record.get("data") or {}).items():
        h = (record.get("holdout") or {}).get(name)
        try:
            s = resolve_recorded(name, str(spec))
            if h:
                s = carve(s, h["val_fraction"], h["test_fraction"], h["seed"])
        except (ValueError, OSError, KeyError):  # DataSpecError, DatasetLayoutError, HoldOutError, a moved folder
            if unreadable is not None:
                unreadable.append(str(spec))
            continue
        if record.get("shots"):
            s = few_shot_splits(s, int(record["shots"]), int(record.get("seed", 1)))
        paths.update(os.path.realpath(x.path) for x in s.train)
    return paths


def evaluate(head, data: DataArg, split: str = "test", *, device: Optional[str] = "auto", progress: bool = False,
             batch_size: int = 100, val_fraction: Optional[float] = None, test_fraction: Optional[float] = None,
             seed: Optional[int] = None) -> dict[str, dict]:
    """Top-1 of `head` on every task of `data`: {task: {top1, n, classes, split, ...}}.

    Never silently scores training images: data without the requested split is evaluated on the
    split the head carved from it at training time (its record holds fractions and seed), or on
    every image when the head never trained on it (`"split": "all"`); otherwise this raises
    EvaluationRefused. Whatever the spec, a split holding an image the head trained on (the same
    files under another reader, other fractions or seed than its holdout) is refused too: the
    training images are rebuilt from the record (`training_images`) and compared by real path.
    `split="train"` is allowed and labelled `"on_training_images": true`.
    `val_fraction`/`test_fraction`/`seed` carve explicitly (e.g. to score zero-shot CLIP on the
    same held-out images a head was tested on).

    Example:
        >>> clipheads.evaluate(head, "photos/")  # doctest: +SKIP
        {'photos': {'top1': 0.93, 'n': 30, 'classes': 5, 'split': 'test', 'carved': True}}
    """
    from .data.holdout import carve
    from .loop import evaluate as evaluate_split

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        from .loop import TrainConfigError

        raise TrainConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = resolve_device(device)
    head.to(device)
    head.backbone.to(device)
    record = getattr(head, "training_record", None) or {}
    trained_on = {absolute_spec(str(v)) for v in (record.get("data") or {}).values()}
    holdouts = record.get("holdout") or {}
    recorded = {absolute_spec(str(v)): holdouts.get(k) for k, v in (record.get("data") or {}).items()}
    results = {}
    seen: Optional[set[str]] = None  # the training images, rebuilt once when first needed
    unreadable: list[str] = []  # recorded training data that no longer reads here
    for i, (name, s) in enumerate(resolve_data(data).items()):
        source = absolute_spec(str(s.meta.get("source", s.name)))
        note: dict = {}
        if val_fraction or test_fraction:
            s = carve(s, val_fraction or 0.0, test_fraction or 0.0, record.get("seed", 1) if seed is None else seed)
            note["carved"] = True
        elif not getattr(s, split) and split != "train" and recorded.get(source):
            h = recorded[source]
            s = carve(s, h["val_fraction"], h["test_fraction"], h["seed"])
            note["carved"] = True
        samples = getattr(s, split)
        used = split
        if not samples and split != "train":
            if source in trained_on:
                raise EvaluationRefused(
                    f"{source} has no {split} split, so its images are what this head trained on; train with "
                    f"--test-fraction F to hold images out, evaluate on other data, or pass --split train "
                    f"to score the training images knowingly")
            if s.val or s.test:
                raise EvaluationRefused(f"{source} has no {split} split (it has "
                                        f"{', '.join(k for k in ('val', 'test') if getattr(s, k))}); choose --split")
            samples, used = s.train, "all"  # unsplit data the head never trained on: every image is held out
        if split != "train":
            seen = training_images(record, unreadable) if seen is None else seen
            trained = sum(os.path.realpath(x.path) in seen for x in samples) if seen else 0
            if trained:
                where = source if used == "all" else f"the {used} split of {source}"
                specs = ", ".join(map(str, (record.get("data") or {}).values()))
                raise EvaluationRefused(
                    f"{trained} of the {len(samples)} images of {where} are images this head trained on (it "
                    f"trained on {specs}): evaluate with the --data it trained on and no --test-fraction/"
                    f"--split-seed to use its held-out split, on other data, or with --split train to score "
                    f"training images knowingly")
        task = _head_task(head, name)
        r = evaluate_split(head, samples, task=task, classnames=s.classnames, device=device,
                           batch_size=batch_size, progress=progress)
        r.update(split=used, **note)
        if split == "train" or (used == "all" and source in trained_on):
            r["on_training_images"] = True
        elif unreadable:
            r["training_data_unreadable"] = list(unreadable)
        results[name] = r
    return results


def _head_task(head, name: str) -> int:
    """The index of the head's task that data named `name` is scored with: that task, or a
    one-task head's only one. A multi-task head's tasks have their own prompts and groups, so
    data that names none of them is refused rather than scored with the first."""
    for k, t in enumerate(head.tasks):
        if t.name == name:
            return k
    if len(head.tasks) == 1:
        return 0
    raise EvaluationRefused(f"{name!r} is not a task of this head ({', '.join(t.name for t in head.tasks)}); "
                            f"name the task the data belongs to: --task TASK=SPEC")


def describe_results(results: Mapping[str, dict]) -> str:
    lines = []
    for n, r in results.items():
        where = {"all": "every image (the head never trained on this data)"}.get(r["split"], f"{r['split']} split")
        warn = "  <- TRAINING IMAGES: not a held-out score" if r.get("on_training_images") else ""
        if r.get("training_data_unreadable"):
            warn = (f"\n  note: the head's training data ({', '.join(r['training_data_unreadable'])}) does not read here "
                    "any more, so images it trained on cannot be recognised; if this data is a copy of it, the score "
                    "is not a held-out one")
        lines.append(f"{n}: top-1 {r['top1']:.2%} ({r['n']} images, {r['classes']} classes, {where}){warn}")
    return "\n".join(lines)

