"""`clipheads bench protocol RECIPE... --data-root DIR --out DIR` and `clipheads bench report OUT`."""
from __future__ import annotations

import shlex
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

from .. import console


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_parallel(recipes, args) -> None:
    """Each recipe in its own process (spawned: safe with CUDA); results land in the same out dir,
    one folder per recipe, so the processes never write the same file."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .runner import run_recipe

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        log = partial(console.info, quiet=args.quiet)  # picklable: the workers log to stderr too
        futures = {pool.submit(run_recipe, r, args.data_root, args.out, args.device, None, False, log, args.recompute): r.name
                   for r in recipes}
        for fut in as_completed(futures):
            fut.result()  # a failed recipe stops the run with its error; finished units are kept
            console.info(f"finished {futures[fut]}", args.quiet)


def _list(args) -> int:
    import json

    from .fidelity import fidelity_rows, render_fidelity_markdown
    from .recipes import list_recipes, load_recipe

    recipes = [load_recipe(n) for n in list_recipes()]
    if args.markdown and not args.json:
        print(render_fidelity_markdown([r for r in recipes if not r.name.startswith("synth_")]))
        return 0
    rows = fidelity_rows(recipes)
    if args.json:
        out = [{"name": r.name, "method": r.method, "protocol": r.protocol, "description": r.description,
                "precision": r.train.get("precision"), **{k: f[k] for k in ("official", "mirrors", "differences", "reasons", "note")}}
               for r, f in zip(recipes, rows)]
        print(json.dumps({"recipes": out}, indent=2, default=str))
        return 0
    for r, f in zip(recipes, rows):
        mirror = ", ".join(m["config"] for m in f["mirrors"]) or "(no official config)"
        diff = ", ".join(k.split(".", 1)[-1] for k in f["differences"]) or "none"
        print(f"{r.name:<30} {r.method:<9} {r.protocol:<22} mirrors {mirror}; differs: {diff}")
    return 0


def _parser() -> console.ArgumentParser:
    p = console.ArgumentParser(prog="clipheads bench", description="Paper protocols: run recipes, write reports.")
    sub = p.add_subparsers(dest="what", required=True)
    run = sub.add_parser("protocol", help="run (or resume) recipes and write the report")
    run.add_argument("recipes", nargs="+", help="recipe files, packaged recipe names (`clipheads bench list`) or patterns such as 'synth_*'")
    run.add_argument("--data-root", required=True, help="folder the recipes' dataset paths are relative to")
    run.add_argument("--out", default="runs/bench", help="results folder (resumable)")
    run.add_argument("--seeds", default=None, help="comma list overriding the recipes' seeds, e.g. 1")
    run.add_argument("--epochs", type=int, default=None, help="override epochs (quick looks; not the paper setting)")
    run.add_argument("--precision", default=None, choices=("amp", "fp32", "fp16"),
                     help="training precision (recipes state theirs; fp16 = the official configs' PREC: fp16)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="method config field for every recipe, e.g. detach_generator=true")
    run.add_argument("--backbone", default=None, metavar="ARCH", help="open_clip architecture for every recipe (default: each recipe's)")
    run.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                     help="weights for every recipe: tag | local path | hf-hub:ID | none (default: each recipe's)")
    run.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    run.add_argument("--jobs", type=int, default=1,
                     help="recipes run in this many processes at once (CPU threads are split between them)")
    run.add_argument("--recompute", action="store_true",
                     help="results of another configuration in --out are moved to runs/<recipe>/stale/ and rerun "
                          "(default: refuse to mix them)")
    console.add_output_flags(run)
    rep = sub.add_parser("report", help="re-render report.md/json/plots from finished runs")
    rep.add_argument("out", help="a results folder written by `clipheads bench protocol`")
    console.add_output_flags(rep)
    lst = sub.add_parser("list", help="list packaged recipes, the official config each mirrors and how it differs")
    lst.add_argument("--markdown", action="store_true", help="the recipe-vs-official-config table (README)")
    console.add_output_flags(lst)
    return p


def _bad_input() -> tuple[type[BaseException], ...]:
    from ..backbone import BackboneError
    from ..data.readers import DatasetLayoutError
    from ..data.sources import DataSpecError
    from ..methods.base import MethodError
    from .recipes import RecipeError
    from .runner import StaleResultsError

    return (RecipeError, StaleResultsError, DatasetLayoutError, DataSpecError, BackboneError, MethodError,
            FileNotFoundError, NotADirectoryError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    args, code = console.parse(_parser(), argv)
    if args is None:
        return code
    return console.run(f"clipheads bench {args.what}", lambda: _main(args, argv), _bad_input(), as_json=args.json)


def _report_payload(out: str, path) -> dict:
    import json

    report = json.loads((Path(out) / "report.json").read_text())
    return {"report": str(Path(path).resolve()), "summary": report.get("summary", {})}


def _main(args, argv: Sequence[str]) -> int:
    from ..fit import resolve_device
    from .recipes import expand_recipe_refs, load_recipe
    from .report import record_command, write_report

    if args.what == "list":
        return _list(args)
    if args.what == "report":
        if not (Path(args.out) / "runs").is_dir():
            raise console.BadInput(f"{args.out}: no finished runs (expected {args.out}/runs/ from `clipheads bench protocol`)")
        path = write_report(args.out)
        console.emit(_report_payload(args.out, path), args.json, f"wrote {path}")
        return 0
    from .runner import run_recipe

    if not Path(args.data_root).expanduser().is_dir():
        raise console.BadInput(f"--data-root {args.data_root}: not a directory (the folder the recipes' datasets live in)")
    recipes = [load_recipe(r) for r in expand_recipe_refs(args.recipes)]
    args.device = resolve_device(args.device)

    def overridden(r):
        changes = {}
        if args.seeds:
            changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
        train = {**r.train, **({"epochs": args.epochs} if args.epochs is not None else {}),
                 **({"precision": args.precision} if args.precision else {})}
        if train != dict(r.train):
            changes["train"] = train
        if args.set:
            from ..cli import _parse_set

            changes["method_config"] = {**r.method_config, **_parse_set(args.set)}
        if args.backbone or args.pretrained:
            changes["backbone"] = {"arch": args.backbone or r.backbone.get("arch"),
                                   "pretrained": args.pretrained or (None if args.backbone else r.backbone.get("pretrained"))}
        return replace(r, **changes)

    recipes = [overridden(r) for r in recipes]
    cmd = "clipheads bench " + " ".join(shlex.quote(a) for a in argv)
    commands = record_command(args.out, cmd)  # before running: an interrupted run still says how to resume
    if args.jobs > 1:
        _run_parallel(recipes, args)
    else:
        for r in recipes:
            run_recipe(r, args.data_root, args.out, device=args.device, progress=not args.quiet,
                       log=partial(console.info, quiet=args.quiet), recompute=args.recompute)
    path = write_report(args.out, commands=commands)
    console.emit(_report_payload(args.out, path), args.json, f"report: {path}")
    return 0
