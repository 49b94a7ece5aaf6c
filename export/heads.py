"""Heads in, bundle out: the library behind `clipheads export` and `clipheads.export(...)`.

`export_bundle` takes head files (or heads already in memory), renames tasks on request
(`--rename OLD=NEW`: two heads trained on the same CSV both call their task after its stem),
builds them on one shared backbone and runs `pipeline.export_heads` (fold -> ONNX -> optimise ->
parity gate -> bundle).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from clipheads.training.methods.base import HeadMethod

from .bundle import check_writable
from .fold import FoldError
from .pipeline import ExportOptions, ExportResult, ExportUsageError, export_heads

HeadRef = Union[str, os.PathLike, HeadMethod]


def parse_renames(items: Sequence[str]) -> dict[str, str]:
    """`OLD=NEW` or `HEAD:OLD=NEW` (HEAD: 1-based position or file name) -> {key: NEW}."""
    out: dict[str, str] = {}
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ExportUsageError(f"--rename expects OLD=NEW (or HEAD:OLD=NEW), got {item!r}")
        if old in out:
            raise ExportUsageError(f"--rename {old} given twice")
        out[old] = new
    return out


def _head_keys(ref: HeadRef, position: int) -> tuple[str, ...]:
    keys = [str(position)]
    if not isinstance(ref, HeadMethod):
        keys += [str(ref), Path(ref).name]
    return tuple(keys)


def rename_tasks(heads: Sequence[HeadMethod], refs: Sequence[HeadRef], renames: Mapping[str, str]) -> list[dict]:
    """Rename tasks in place; returns [{head, from, to}]. Every OLD names a task as the heads came
    (renames apply at once, so two tasks can swap names); a bare OLD must name one head's task."""
    original = [[spec.name for spec in h.tasks] for h in heads]
    planned: dict[tuple[int, int], tuple[str, str]] = {}
    for key, new in renames.items():
        where, sep, old = key.rpartition(":") if ":" in key else ("", "", key)
        hits = [(i, t) for i, names in enumerate(original) for t, name in enumerate(names) if name == old
                and (not sep or where in _head_keys(refs[i], i + 1))]
        if not hits:
            known = ", ".join(f"{i + 1}:{name}" for i, names in enumerate(original) for name in names)
            raise ExportUsageError(f"--rename {key}={new}: no such task (tasks: {known})")
        if len({i for i, _ in hits}) > 1:
            raise ExportUsageError(f"--rename {old}={new}: {len({i for i, _ in hits})} heads have a task {old!r}; "
                                   f"say which, e.g. --rename {hits[0][0] + 1}:{old}={new}")
        for hit in hits:
            if hit in planned:
                raise ExportUsageError(f"--rename {key}={new}: task {hit[0] + 1}:{old} is already renamed "
                                       f"to {planned[hit][1]!r}")
            planned[hit] = (old, new)
    done = []
    for i, h in enumerate(heads):
        tasks = list(h.tasks)
        for t in range(len(tasks)):
            if (i, t) in planned:
                old, new = planned[(i, t)]
                tasks[t] = replace(tasks[t], name=new)
                done.append({"head": i + 1, "from": old, "to": new})
        h.tasks = tuple(tasks)
    return done


def register_extra_model_configs() -> None:
    """`CLIPHEADS_MODEL_CONFIGS=DIR[:DIR]`: extra open_clip architecture JSONs (as serving/ reads them)."""
    extra = os.environ.get("CLIPHEADS_MODEL_CONFIGS")
    if extra:
        import open_clip

        for d in extra.split(os.pathsep):
            if d and Path(d).is_dir():
                open_clip.add_model_config(d)


def load_heads(refs: Sequence[HeadRef], backbone_weights: Optional[str] = None,
               log: Optional[Callable[[str], None]] = None):
    """Head files (and/or built heads) on one shared backbone -> (heads, heads_meta, preprocess).
    `backbone_weights`: where the files' weights are now (sha256-checked against their record).
    Heads given as objects are shallow-copied, so renaming tasks never changes the caller's."""
    import copy

    from clipheads.training.artifact import load_head
    from clipheads.training.backbone_record import record_differences
    from clipheads.training.methods import get_method

    if not refs:
        raise FoldError("nothing to export: give at least one head")
    register_extra_model_configs()
    arts = {i: load_head(r) for i, r in enumerate(refs) if not isinstance(r, HeadMethod)}
    live = {i: copy.copy(r) for i, r in enumerate(refs) if isinstance(r, HeadMethod)}
    names = {i: str(r) if i in arts else f"head {i + 1} ({r.name})" for i, r in enumerate(refs)}
    records = {i: (a.backbone, a.preprocess, a.method) for i, a in arts.items()}
    records.update({i: (h.backbone.record(), h.backbone.preprocess, h.name) for i, h in live.items()})
    first = records[0]
    for i, (record, pre, _) in records.items():
        diffs = record_differences(first[0], record)
        if diffs:
            raise FoldError(f"{names[i]}: backbone differs from {names[0]}'s ({'; '.join(diffs)}); "
                            "one bundle holds heads of one backbone")
        if pre != first[1]:
            raise FoldError(f"{names[i]}: preprocessing differs from {names[0]}'s")
    for i, (*_, method) in records.items():  # refuse before paying for the backbone
        cls = get_method(method)
        if not cls.foldable:
            raise FoldError(f"{names[i]}: method {method!r} is not foldable into [image graph + constant class "
                            f"matrix] ({cls.summary}); serve the head file with the PyTorch runtime instead")
    if live:
        backbone = next(iter(live.values())).backbone
        if any(h.backbone is not backbone for h in live.values()):
            raise FoldError("heads given as objects must share one Backbone object")
    else:
        backbone = arts[0].open_backbone(backbone_weights, log=log)
    heads = [live[i] if i in live else arts[i].build(backbone) for i in range(len(refs))]
    meta = []
    for i, h in enumerate(heads):
        training = arts[i].training if i in arts else (getattr(h, "training_record", None) or {})
        meta.append({**({"file": str(refs[i])} if i in arts else {}), "method": h.name, "config": h.config.to_dict(),
                     "tasks": [t.name for t in h.tasks],
                     "training": {k: training[k] for k in ("data", "shots", "seed", "metrics") if k in training}})
    return heads, meta, first[1]


def export_bundle(
    heads: Sequence[HeadRef],
    out: Optional[Union[str, os.PathLike]],
    options: ExportOptions = ExportOptions(),
    *,
    backbone_weights: Optional[str] = None,
    rename: Optional[Mapping[str, str]] = None,
    allow_parity_failure: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> ExportResult:
    """Export heads (paths or HeadMethods on one backbone) into a parity-gated bundle at `out`."""
    options.validate()
    if out is not None:
        check_writable(out)  # before loading the backbone
    built, meta, preprocess = load_heads(heads, backbone_weights, log=log)
    for r in rename_tasks(built, heads, rename or {}):
        meta[r["head"] - 1].setdefault("renamed", {})[r["from"]] = r["to"]
    for m, h in zip(meta, built):
        m["tasks"] = [t.name for t in h.tasks]
    return export_heads(built, out, options, meta, preprocess, allow_parity_failure, log=log)
