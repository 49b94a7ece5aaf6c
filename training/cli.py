"""`clipheads train | eval | info | methods | data`: a thin argparse layer over the library.

Configs merge in one documented order, then freeze: dataclass defaults -> recipe file ->
command-line flags. Exit codes: 0 ok, 1 failure, 2 bad usage or bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional, Sequence

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .artifact import ArtifactError
    from .backbone import BackboneError
    from .data.sources import DataSpecError
    from .methods.base import MethodError

    return (ArtifactError, BackboneError, MethodError, DataSpecError, FileNotFoundError)


def _print(payload: dict, as_json: bool, human: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if as_json else human)


def _parse_set(items: Sequence[str]) -> dict:
    """`--set key=value` pairs; values parsed as JSON when possible (numbers, bools, lists)."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# ---- train ---------------------------------------------------------------------------------
def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    from .backbone import PACKAGED_ARCH

    p.add_argument("--backbone", default=PACKAGED_ARCH, help=f"open_clip architecture (default {PACKAGED_ARCH})")
    p.add_argument("--pretrained", default=None, help="tag | local path | hf-hub:ID | none (default: the arch's default); "
                                                      "with a HEAD: where the head's backbone weights are now (sha256-checked)")
    p.add_argument("--act", default=None, choices=("quickgelu", "gelu"),
                   help="activation the weights were trained with (OpenAI's: quickgelu); tags, hf-hub configs and "
                        "`clipheads convert` files state it themselves, a plain local file on an arch with both kinds needs it")
    p.add_argument("--device", default="cpu")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a head and write NAME.head.safetensors")
    p.add_argument("--method", default=None, help="method name (see `clipheads methods`)")
    p.add_argument("--recipe", default=None, help="JSON recipe: {method, method_config, train}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config field")
    p.add_argument("--data", action="append", default=[], help="ImageFolder dir | split_zhou .json | .csv | reader:ROOT")
    p.add_argument("--task", action="append", default=[], metavar="NAME=DATA", help="named task (multi-task runs)")
    p.add_argument("--classes", action="append", default=[], metavar="NAME=C1,C2,...",
                   help="a task given by its class names alone (no images: zero-shot heads)")
    p.add_argument("--shots", type=int, default=None, help="K-shot sampling per class (Dassl semantics)")
    p.add_argument("--out", required=True, help="output head path (NAME.head.safetensors)")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    for f in fields(_train_config_cls()):
        if f.name in ("device", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {int: int, float: float, str: str, bool: None}.get(type(f.default), None)
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f"tc_{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            p.add_argument(flag, dest=f"tc_{f.name}", type=kind or float, default=None)
    p.set_defaults(func=cmd_train)


def _train_config_cls():
    from .loop import TrainConfig

    return TrainConfig


def _load_recipe(path: Optional[str]) -> dict:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    unknown = set(data) - {"method", "method_config", "train", "name", "description", "protocol", "papers"}
    if unknown:
        raise SystemExit(f"recipe {path}: unknown keys {sorted(unknown)}")
    return data


def cmd_train(args) -> int:
    from .artifact import save_head
    from .backbone import load_backbone
    from .data.fewshot import few_shot_splits
    from .data.sources import DataSpecError, resolve_tasks
    from .loop import TrainConfig, TrainResult, evaluate, train_head
    from .methods import TaskSpec, build_method

    recipe = _load_recipe(args.recipe)
    method = args.method or recipe.get("method")
    if not method:
        raise SystemExit("choose a method: --method NAME or --recipe FILE")
    method_cfg = {**recipe.get("method_config", {}), **_parse_set(args.set)}
    tc = TrainConfig(**{**recipe.get("train", {}), "device": args.device, "progress": not args.json})
    overrides = {f.name: getattr(args, f"tc_{f.name}") for f in fields(TrainConfig) if getattr(args, f"tc_{f.name}", None) is not None}
    tc = replace(tc, **overrides)
    named = {**(resolve_tasks(args.data, args.task) if args.data or args.task else {}), **_class_tasks(args.classes)}
    if not named:
        raise DataSpecError("no tasks given: use --data SPEC, --task NAME=SPEC or --classes NAME=C1,C2,...")
    if args.shots:
        named = {n: few_shot_splits(s, args.shots, tc.seed) for n, s in named.items()}
    tasks = [TaskSpec(n, s.classnames, s.templates) for n, s in named.items()]
    backbone = load_backbone(args.backbone, args.pretrained, device=args.device, act=args.act)
    _say(f"backbone: {backbone.describe_weights()} [{backbone.act_reason}]")
    head = build_method(method, backbone, tasks, method_cfg)
    if head.num_trainable() == 0:  # zero-shot: the head is its class names and templates, no tensors
        result = TrainResult(head)
    else:
        if not any(s.train for s in named.values()):
            raise DataSpecError(f"{method} learns from images: give --data/--task with training images")
        frozen_before = backbone.parameters_checksum()
        result = train_head(head, {i: s.train for i, s in enumerate(named.values())}, tc)
        if backbone.parameters_checksum() != frozen_before:
            raise RuntimeError("the frozen backbone changed during training: a method leaked a gradient")
    metrics = {}
    if not args.no_eval:
        for i, (name, s) in enumerate(named.items()):
            if s.test:
                metrics[name] = evaluate(head, s.test, task=i, device=args.device)["top1"]
    training = {
        "data": {n: s.meta.get("source", s.name) for n, s in named.items()},
        "shots": args.shots,
        "seed": tc.seed,
        "trained": head.num_trainable() > 0,
        "epochs": tc.epochs if head.num_trainable() else 0,
        "config": tc.to_dict() if head.num_trainable() else None,
        "metrics": {"test_top1": metrics, **({"final_loss": result.final_loss, "first_loss": result.first_loss}
                                             if result.history else {})},
        "history": result.history,
        "wall_time_s": round(result.wall_time_s, 2),
        "trainable_parameters": head.num_trainable(),
    }
    path = save_head(head, args.out, training)
    payload = {"head": str(path), "method": method, "trainable_parameters": head.num_trainable(), **training}
    acc = ", ".join(f"{n} {v:.1%}" for n, v in metrics.items()) or "not evaluated"
    if not training["trained"]:
        _print(payload, args.json, f"{method}: nothing to train ({sum(len(t.classnames) for t in tasks)} class names, "
               f"templates {list(tasks[0].templates)}); test top-1: {acc}; wrote {path}")
        return EXIT_OK
    _print(payload, args.json, f"trained {method} ({head.num_trainable():,} params) in {result.wall_time_s:.1f}s; "
           f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}; test top-1: {acc}; wrote {path}")
    return EXIT_OK


def _class_tasks(items: Sequence[str]) -> dict:
    """`--classes NAME=C1,C2,...` -> {NAME: DatasetSplits with class names and no images}."""
    from .data.records import DatasetSplits
    from .data.sources import DataSpecError

    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        names = tuple(c.strip() for c in raw.split(",") if c.strip())
        if not sep or not name or len(names) < 2 or len(set(names)) != len(names):
            raise DataSpecError(f"--classes expects NAME=C1,C2,... with at least two distinct class names, got {item!r}")
        out[name] = DatasetSplits(name, names, train=(), meta={"source": "--classes"})
    return out


# ---- eval ----------------------------------------------------------------------------------
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a head (or zero-shot CLIP) on a dataset split")
    p.add_argument("head", nargs="?", help="NAME.head.safetensors (omit for zero-shot with --backbone)")
    p.add_argument("--data", action="append", default=[], required=False)
    p.add_argument("--task", action="append", default=[], metavar="NAME=DATA")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .artifact import load_head
    from .backbone import load_backbone
    from .data.sources import resolve_tasks
    from .loop import evaluate
    from .methods import TaskSpec, build_method

    named = resolve_tasks(args.data, args.task)
    if args.head:
        head = load_head(args.head).build(device=args.device, weights_override=args.pretrained, log=_say)
    else:
        backbone = load_backbone(args.backbone, args.pretrained, device=args.device, act=args.act)
        _say(f"backbone: {backbone.describe_weights()}")
        head = build_method("zeroshot", backbone, [TaskSpec(n, s.classnames, s.templates) for n, s in named.items()])
    results = {}
    for i, (name, s) in enumerate(named.items()):
        samples = getattr(s, args.split)
        if not samples and args.split == "test" and not s.val:
            samples = s.train  # an unsplit ImageFolder/CSV: evaluate on every image it lists
        task = next((k for k, t in enumerate(head.tasks) if t.name == name), min(i, len(head.tasks) - 1))
        results[name] = evaluate(head, samples, task=task, classnames=s.classnames, device=args.device, progress=not args.json)
    human = "\n".join(f"{n}: top-1 {r['top1']:.2%} ({r['n']} images, {r['classes']} classes)" for n, r in results.items())
    bb = head.backbone
    _print({"head": args.head, "method": head.name, "split": args.split, "results": results,
            "backbone": {"arch": bb.arch, "act": bb.act, "weights_file": bb.weights_file, "weights_sha256": bb.weights_sha256}},
           args.json, human)
    return EXIT_OK


# ---- info / methods ------------------------------------------------------------------------
def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a head file")
    p.add_argument("head")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .artifact import describe, load_head

    d = describe(load_head(args.head))
    tasks = "; ".join(f"{t['name']} ({t['classes']} classes)" for t in d["tasks"])
    metrics = d["training"].get("metrics", {}).get("test_top1", {})
    human = (
        f"{args.head}\n  method   {d['method']} {json.dumps(d['config'])}\n"
        f"  backbone {d['backbone'].get('arch')} / {d['backbone'].get('pretrained')} "
        f"({ {'quickgelu': 'QuickGELU', 'gelu': 'GELU'}.get(d['backbone'].get('act'), 'activation not recorded')}, "
        f"weights sha256 {str(d['backbone'].get('weights_sha256') or 'none')[:12]})\n"
        f"  tasks    {tasks}\n  params   {d['stored_values']:,} stored values in {len(d['tensors'])} tensors\n"
        f"  trained  {d['training'].get('epochs', '?')} epochs, {d['training'].get('shots') or 'all'} shots, "
        f"seed {d['training'].get('seed', '?')}, {d['training'].get('wall_time_s', '?')} s; test top-1 {metrics}"
    )
    _print(d, args.json, human)
    return EXIT_OK


def _methods_parser(sub) -> None:
    p = sub.add_parser("methods", help="list methods with trainable-parameter counts on a backbone")
    p.add_argument("--backbone", default=None, help="count on this open_clip architecture (random init)")
    p.add_argument("--tasks", type=int, default=1, help="number of tasks (multi-task methods count per task)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)


def method_table(arch: Optional[str], n_tasks: int = 1) -> list[dict]:
    from .backbone import BackboneError, PACKAGED_ARCH, load_backbone
    from .methods import TaskSpec, build_method, get_method, list_methods

    backbone = load_backbone(arch or PACKAGED_ARCH, "none")
    total = sum(p.numel() for p in backbone.model.parameters())
    tasks = [TaskSpec(f"task{i}", ("cat", "dog", "car"), group=i % 2) for i in range(n_tasks)]
    rows = []
    for name in list_methods():
        cls = get_method(name)
        row = {"method": name, "towers": list(cls.towers), "foldable": cls.foldable, "summary": cls.summary}
        try:
            n = build_method(name, backbone, tasks).num_trainable()
            row.update(trainable=n, share=n / total)
        except BackboneError as err:
            row.update(trainable=None, share=None, error=str(err).splitlines()[0])
        rows.append(row)
    return rows


def cmd_methods(args) -> int:
    from .backbone import PACKAGED_ARCH

    arch = args.backbone or PACKAGED_ARCH
    rows = method_table(arch, args.tasks)
    lines = [f"methods on {arch} (random init, {args.tasks} task(s)):",
             f"{'method':<10} {'trainable':>12} {'share':>9}  {'towers':<13} {'folds':<5}  summary"]
    for r in rows:
        n = f"{r['trainable']:,}" if r["trainable"] is not None else "n/a"
        share = f"{r['share']:.4%}" if r["share"] is not None else ""
        lines.append(f"{r['method']:<10} {n:>12} {share:>9}  {'+'.join(r['towers']) or '-':<13} "
                     f"{'yes' if r['foldable'] else 'no':<5}  {r.get('error') or r['summary']}")
    _print({"backbone": arch, "methods": rows}, args.json, "\n".join(lines))
    return EXIT_OK


# ---- data ----------------------------------------------------------------------------------
def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="data utilities: `data synth OUT` writes the synthetic world",
                       description="`clipheads data synth OUT [--seed S] [--size small|full] [--workers N]`: "
                                   "render the synthetic world (`clipheads data synth --help` for every option)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="synth OUT [options]")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
    rest = list(args.rest)
    if not rest or rest[0] != "synth":
        raise SystemExit("usage: clipheads data synth OUT [--seed S] [--size small|full]")
    from .data import synth

    return int(synth.main(rest[1:]) or 0)


# ---- convert -------------------------------------------------------------------------------
def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="a CLIP checkpoint (OpenAI .pt, state dict) -> open_clip safetensors",
                       description="One-time conversion of a CLIP checkpoint into an fp32 open_clip safetensors file that "
                                   "records its architecture and activation. OpenAI's .pt files are TorchScript "
                                   "archives: reading one runs code from the file, hence --trust-torchscript.")
    p.add_argument("src", help="checkpoint: OpenAI TorchScript .pt, pickled state dict (.pt/.bin) or .safetensors")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="allow reading a TorchScript archive (runs code stored in it; only for files you trust)")
    p.add_argument("--arch", default=None, help="open_clip architecture (default: inferred from the tensor shapes)")
    p.add_argument("--act", default=None, choices=("quickgelu", "gelu"),
                   help="activation the weights need (default: quickgelu for OpenAI TorchScript archives, else unrecorded)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .backbone import register_packaged_configs
    from .backbone_convert import convert_checkpoint

    register_packaged_configs()
    r = convert_checkpoint(args.src, args.out, trust_torchscript=args.trust_torchscript, arch=args.arch, act=args.act)
    act = {"quickgelu": "QuickGELU", "gelu": "GELU"}.get(r.act or "", "activation not recorded (pass --act when loading)")
    use = f"--backbone {r.arch} --pretrained {r.out}" if r.arch else f"--pretrained {r.out}"
    _print(r.to_json(), args.json, f"wrote {r.out}: {r.tensors} tensors, {r.arch or 'architecture not recognised'}, "
           f"{act} [{r.act_source}], sha256 {r.sha256[:12]}…\nuse it with: {use}")
    return EXIT_OK


COMMANDS = (_train_parser, _eval_parser, _info_parser, _methods_parser, _data_parser, _convert_parser)


def register(sub) -> None:
    for add in COMMANDS:
        add(sub)


def run(args) -> int:
    try:
        return args.func(args)
    except _bad_input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="clipheads")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
