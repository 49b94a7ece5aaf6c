"""`clipheads train | eval | info | methods | data`: a thin argparse layer over the library.

Every command takes `--json` and `-q/--quiet` and follows training/console.py (exit codes 0 ok,
1 failure, 2 bad usage or bad input with one line on stderr). What a command does lives in
library functions (`fit.train`, `fit.evaluate`, `artifact.describe`, ...), the same ones the
Python API (`clipheads.train`, ...) exposes; the library never sees an argparse namespace.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Optional, Sequence

from . import console
from .console import EXIT_OK


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .artifact import ArtifactError
    from .backbone import BackboneError
    from .data.holdout import HoldOutError
    from .data.readers import DatasetLayoutError
    from .data.sources import DataSpecError
    from .fit import EvaluationRefused
    from .loop import TrainConfigError
    from .methods.base import MethodError
    from .protocols.recipes import RecipeError

    return (ArtifactError, BackboneError, MethodError, DataSpecError, DatasetLayoutError, HoldOutError,
            EvaluationRefused, RecipeError, TrainConfigError, FileNotFoundError, NotADirectoryError)


def _parse_set(items: Sequence[str]) -> dict:
    """`--set key=value` pairs; values parsed as JSON when possible (numbers, bools, lists)."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise console.BadInput(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _pct(metrics: dict) -> str:
    return ", ".join(f"{n} {v:.1%}" for n, v in metrics.items()) or "not evaluated"


# ---- shared flags ----------------------------------------------------------------------------
def _add_backbone_args(p: argparse.ArgumentParser, default_arch: Optional[str]) -> None:
    from .backbone import PACKAGED_ARCH

    fallback = default_arch or f"the recipe's, else {PACKAGED_ARCH}"
    p.add_argument("--backbone", default=default_arch, metavar="ARCH", help=f"open_clip architecture (default: {fallback})")
    p.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                   help="open_clip tag | local checkpoint path | hf-hub:ID | none (default: the architecture's "
                        "default: packaged weights for clipheads-tiny, else openai or its first tag); with a HEAD: "
                        "where the head's backbone weights are now (sha256-checked)")
    p.add_argument("--act", default=None, choices=("quickgelu", "gelu"),
                   help="activation the weights were trained with (OpenAI's: quickgelu); tags, hf-hub configs and "
                        "`clipheads convert` files state it themselves, a plain local file on an arch with both kinds needs it")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="ImageFolder dir | split_zhou .json | .csv manifest | READER:ROOT[:ARG]; repeat for multi-task")
    p.add_argument("--task", action="append", default=[], metavar="NAME=SPEC",
                   help="a named task (multi-task runs; the name replaces the data's own)")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="hold out this share of each class as val, for data without a val split (seeded)")
    p.add_argument("--test-fraction", type=float, default=None, metavar="F",
                   help="hold out this share of each class as test, for data without a test split (seeded)")


# ---- train -----------------------------------------------------------------------------------
def _defaults_epilog() -> str:
    from .backbone import PACKAGED_ARCH
    from .fit import PAPER_ARCH, default_recipe
    from .methods import list_methods

    rows = []
    for m in list_methods():
        tiny, other = default_recipe(m, PACKAGED_ARCH), default_recipe(m, PAPER_ARCH)
        rows.append(f"  {m:<9} {tiny.name if tiny else '-':<26} {other.name if other else '-'}")
    return ("Defaults: settings merge as dataclass defaults -> recipe -> your flags. Without --recipe each method "
            "starts from its packaged recipe for the backbone (recorded in the head as training.recipe):\n"
            f"  {'method':<9} {'on ' + PACKAGED_ARCH:<26} on any other backbone\n" + "\n".join(rows)
            + "\n--recipe none uses the bare dataclass defaults shown below.")


def _train_parser(sub) -> None:
    from .loop import TrainConfig
    from .methods import list_methods

    p = sub.add_parser("train", help="train a head and write NAME.head.safetensors", epilog=_defaults_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a head (any method) on one or more datasets.")
    p.add_argument("--method", default=None, choices=list_methods(), metavar="METHOD",
                   help=f"one of: {', '.join(list_methods())} (default: the recipe's)")
    p.add_argument("--recipe", default="default", metavar="NAME|FILE",
                   help="packaged recipe name or JSON file whose method_config and train settings to start from "
                        "(default: the method's recipe for this backbone, see below; 'none': dataclass defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method-config field over the recipe's, e.g. --set n_ctx=4 (repeatable)")
    _add_data_args(p)
    p.add_argument("--classes", action="append", default=[], metavar="NAME=C1,C2,...",
                   help="a task given by its class names alone (no images: zero-shot heads)")
    p.add_argument("--shots", type=int, default=None, metavar="K", help="K images per class (Dassl semantics, seeded)")
    p.add_argument("--out", required=True, metavar="NAME.head.safetensors", help="where to write the head")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after training")
    _add_backbone_args(p, None)
    console.add_output_flags(p)
    for f in fields(TrainConfig):
        if f.name in ("device", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata.get('help', f.name)} (default: the recipe's, else {f.default!r})"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f"tc_{f.name}", action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, dest=f"tc_{f.name}", type=float, nargs=len(f.default), default=None,
                           metavar=("MIN", "MAX") if len(f.default) == 2 else None, help=helptext)
        else:
            kind = {int: int, float: float, str: str}.get(type(f.default), int)
            p.add_argument(flag, dest=f"tc_{f.name}", type=kind, default=None, metavar=f.name.upper(), help=helptext)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .data.sources import DataSpecError, resolve_tasks
    from .fit import train
    from .loop import TrainConfig

    overrides = {f.name: getattr(args, f"tc_{f.name}") for f in fields(TrainConfig)
                 if getattr(args, f"tc_{f.name}", None) is not None}
    named = {**(resolve_tasks(args.data, args.task) if args.data or args.task else {}), **_class_tasks(args.classes)}
    if not named:
        raise DataSpecError("no tasks given: use --data SPEC, --task NAME=SPEC or --classes NAME=C1,C2,...")
    head = train(
        args.method, named,
        backbone=args.backbone, pretrained=args.pretrained, act=args.act,
        log=lambda msg: console.info(msg, args.quiet),
        recipe=None if args.recipe == "none" else args.recipe, config=_parse_set(args.set), shots=args.shots,
        val_fraction=args.val_fraction or 0.0, test_fraction=args.test_fraction or 0.0,
        device=args.device, evaluate=not args.no_eval, progress=not (args.quiet), out=args.out,
        **overrides,
    )
    rec = head.training_record
    payload = {"head": rec["head"], "method": head.name, **rec}
    m = rec["metrics"]
    if not rec["trained"]:
        tasks = head.tasks
        console.emit(payload, args.json, f"{head.name}: nothing to train ({sum(len(t.classnames) for t in tasks)} "
                     f"class names, templates {list(head.templates_for(0))}); test top-1: {_pct(m['test_top1'])}; "
                     f"wrote {rec['head']}")
        return EXIT_OK
    console.emit(payload, args.json,
                 f"trained {head.name} ({head.num_trainable():,} params, defaults from {rec['defaults']}) in "
                 f"{rec['wall_time_s']:.1f}s; loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}; "
                 f"test top-1: {_pct(m['test_top1'])}; wrote {rec['head']}")
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


# ---- eval ------------------------------------------------------------------------------------
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a head (or zero-shot CLIP) on a dataset split",
                       description="Top-1 of a head, or of zero-shot CLIP without one. Data without the requested "
                                   "split is scored on the split the head held out at training time, or on every "
                                   "image if the head never trained on it; scoring training images is refused "
                                   "unless you ask for --split train.")
    p.add_argument("head", nargs="?", help="NAME.head.safetensors (omit for zero-shot CLIP with --backbone)")
    _add_data_args(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default test)")
    p.add_argument("--split-seed", type=int, default=None, metavar="S",
                   help="seed for --val/--test-fraction (default: the head's training seed, else 1)")
    p.add_argument("--batch-size", type=int, default=100, help="images per evaluation batch")
    _add_backbone_args(p, None)
    console.add_output_flags(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .backbone import PACKAGED_ARCH, load_backbone
    from .data.sources import resolve_tasks
    from .fit import describe_results, evaluate, open_head, resolve_device
    from .methods import TaskSpec, build_method

    device = resolve_device(args.device)
    data = resolve_tasks(args.data, args.task)
    if args.head:
        head = open_head(args.head, pretrained=args.pretrained, device=device,
                         log=lambda msg: console.info(msg, args.quiet))
    else:
        backbone = load_backbone(args.backbone or PACKAGED_ARCH, args.pretrained, device=device, act=args.act)
        console.info(f"backbone: {backbone.describe_weights()}", args.quiet)
        head = build_method("zeroshot", backbone, [TaskSpec(n, s.classnames, s.templates) for n, s in data.items()])
    results = evaluate(head, data, args.split, device=device, progress=not (args.quiet),
                       batch_size=args.batch_size, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                       seed=args.split_seed)
    bb = head.backbone
    console.emit({"head": args.head, "method": head.name, "split": args.split, "results": results,
                  "backbone": {"arch": bb.arch, "act": bb.act, "weights_file": bb.weights_file,
                               "weights_sha256": bb.weights_sha256}}, args.json, describe_results(results))
    return EXIT_OK


# ---- info / methods --------------------------------------------------------------------------
def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a head file", description="What a head file holds.")
    p.add_argument("head", help="NAME.head.safetensors")
    console.add_output_flags(p)
    p.set_defaults(func=cmd_info)


def describe_text(path: str, d: dict) -> str:
    """`clipheads info` as readable lines."""
    t = d["training"]
    cfg = ", ".join(f"{k}={v}" for k, v in d["config"].items()) or "defaults"
    tasks = "; ".join(f"{x['name']} ({x['classes']} classes)" for x in d["tasks"])
    bb = d["backbone"]
    sha = str(bb.get("weights_sha256") or "none")[:12]
    act = {"quickgelu": "QuickGELU", "gelu": "GELU"}.get(bb.get("act"), "activation not recorded")
    data = ", ".join(f"{k}: {v}" for k, v in (t.get("data") or {}).items()) or "?"
    held = "; ".join(f"{k}: val {h['val_fraction']:g}, test {h['test_fraction']:g} (seed {h['seed']})"
                     for k, h in (t.get("holdout") or {}).items())
    metrics = (t.get("metrics") or {}).get("test_top1") or {}
    pre = d["preprocess"]
    lines = [
        path,
        f"  method      {d['method']} ({cfg})",
        f"  backbone    {bb.get('arch')} / {bb.get('pretrained')} ({act}, weights sha256 {sha})",
        f"  tasks       {tasks}",
        f"  tensors     {d['stored_values']:,} values in {len(d['tensors'])} tensors",
        f"  preprocess  {pre['image_size']} px, resize {pre.get('resize')}, crop {pre.get('crop')}, "
        f"orientation {pre.get('orientation', 'none (head predates EXIF handling)')}",
        f"  data        {data}",
    ]
    if held:
        lines.append(f"  held out    {held}")
    lines += [
        f"  trained     {t.get('epochs', '?')} epochs, {t.get('shots') or 'all'} shots, seed {t.get('seed', '?')}, "
        f"{t.get('wall_time_s', '?')} s" + (f", defaults from {t['defaults']}" if t.get("defaults") else ""),
        f"  test top-1  {_pct(metrics)}",
        f"  versions    format {d['format_version']}, clipheads {d['package_version']}",
    ]
    return "\n".join(lines)


def cmd_info(args) -> int:
    from .artifact import describe, load_head

    d = describe(load_head(args.head))
    console.emit(d, args.json, describe_text(args.head, d))
    return EXIT_OK


def _methods_parser(sub) -> None:
    p = sub.add_parser("methods", help="list methods with trainable-parameter counts on a backbone",
                       description="Every registered method: trainable parameters on a backbone (random init), the "
                                   "towers it touches, whether it folds for export.")
    p.add_argument("--backbone", default=None, metavar="ARCH", help="count on this open_clip architecture (random init)")
    p.add_argument("--tasks", type=int, default=1, help="number of tasks (multi-task methods count per task)")
    console.add_output_flags(p)
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
    console.emit({"backbone": arch, "methods": rows}, args.json, "\n".join(lines))
    return EXIT_OK


# ---- data ------------------------------------------------------------------------------------
def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="data utilities: `data synth OUT` writes the synthetic world",
                       description="`clipheads data synth OUT [--seed S] [--size small|full] [--workers N] [--overwrite] [--json]`: "
                                   "render the synthetic world (`clipheads data synth --help` for every option)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="synth OUT [options]", help="the data subcommand")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
    rest = list(args.rest)
    if not rest or rest[0] != "synth":
        raise console.BadInput("usage: clipheads data synth OUT [--seed S] [--size small|full]")
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
    console.add_output_flags(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .backbone import register_packaged_configs
    from .backbone_convert import convert_checkpoint

    register_packaged_configs()
    r = convert_checkpoint(args.src, args.out, trust_torchscript=args.trust_torchscript, arch=args.arch, act=args.act)
    act = {"quickgelu": "QuickGELU", "gelu": "GELU"}.get(r.act or "", "activation not recorded (pass --act when loading)")
    use = f"--backbone {r.arch} --pretrained {r.out}" if r.arch else f"--pretrained {r.out}"
    console.emit(r.to_json(), args.json, f"wrote {r.out}: {r.tensors} tensors, {r.arch or 'architecture not recognised'}, "
                 f"{act} [{r.act_source}], sha256 {r.sha256[:12]}…\nuse it with: {use}")
    return EXIT_OK


COMMANDS = (_train_parser, _eval_parser, _info_parser, _methods_parser, _data_parser, _convert_parser)


def register(sub) -> None:
    for add in COMMANDS:
        add(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = console.ArgumentParser(prog="clipheads")
    register(parser.add_subparsers(dest="command", required=True))
    args, code = console.parse(parser, argv)
    if args is None:
        return code
    return console.run(f"clipheads {args.command}", lambda: args.func(args), _bad_input_errors(),
                       as_json=getattr(args, "json", False))
