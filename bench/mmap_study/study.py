"""MmAP design study on the synthetic world's 4-domain multi-task setting (issue 14.5).

MmAP has no public code, so every unknown of our design (METHODS.md 7.5) is a config field. This
script varies them one at a time from the shipped synthetic-world recipe (`synth_mmap_multitask`),
scores each variant on the world's VALIDATION split (seed 1), then runs the chosen variants with 3
seeds on the TEST split beside MaPLe-MT. Every unit goes through the protocol runner
(`clipheads.training.protocols.runner.run_recipe`), so it is resumable and keyed on its effective
configuration; results land in `bench/mmap_study/runs/<val|test>_<variant>/`.

    python bench/mmap_study/study.py init  --world runs/world-s1            # init diagnosis, no training
    python bench/mmap_study/study.py val   --world runs/world-s1 --jobs 4   # one factor at a time, seed 1
    python bench/mmap_study/study.py test  --world runs/world-s1 --variants ctx_init --seeds 1 2 3
    python bench/mmap_study/study.py table                                   # results.md / results.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

BASE_RECIPE = "synth_mmap_multitask"
# variant -> (method_config changes, train changes, why it is tried)
VARIANTS: dict[str, tuple[dict, dict, str]] = {
    "base": ({}, {}, "the shipped recipe: n=2 (concat: 4 tokens), all 4 blocks, d_s=32, A=1, S~N(0,0.02^2), "
                     "random slots before a frozen 'a photo of a'"),
    "ctx_init": ({"text_suffix": None, "ctx_init": "a photo of a"}, {},
                 "text-side init: the shallow text prompt = frozen 'a photo of a' embeddings + the learned "
                 "Kronecker prompt (starts at the zero-shot template instead of 4 random words before it)"),
    "init0": ({"init_std": 0.0}, {}, "source prompts start at exactly 0 (no seed-dependent init)"),
    "sum": ({"combine": "sum"}, {}, "group-shared + task-specific summed (n tokens) instead of concatenated (2n)"),
    "shallow": ({"depth": 1}, {}, "prompts at the input only (J=1)"),
    "depth2": ({"depth": 2}, {}, "prompts in the first 2 blocks"),
    "n_ctx1": ({"n_ctx": 1}, {}, "1 token per instance"),
    "n_ctx4": ({"n_ctx": 4}, {}, "4 tokens per instance"),
    "d_s16": ({"source_dim": 16}, {}, "narrower source prompt (d_s=16, factors 6 and 8 wide)"),
    "factor_noise": ({"factor_init_std": 0.5}, {}, "A_t, A_v = 1 + N(0, 0.5^2): the copies of S differ from the start"),
    "one_group": ({"n_groups": 1}, {}, "grouping off: one group-shared prompt for all tasks + task-specific"),
    "task_only": ({"group_shared": False}, {}, "task-specific prompts only"),
    "lr0.005": ({}, {"lr": 0.005}, "learning rate 0.005 (0.002 was chosen on single-task held-out sketch)"),
    "factor_per_layer": ({"factor_per_layer": True}, {}, "one (A_t, A_v) pair per prompted block instead of per instance"),
    "factor_frozen": ({"factor_lr_scale": 0.0}, {}, "A_t, A_v frozen at 1: the Kronecker product only repeats S"),
    "warmup200": ({"grouping_steps": 200}, {}, "grouping warm-up of 200 steps instead of the default 5..50"),
}
# second pass (stacked on the first pass's choice, `ctx_init`): every remaining unknown of issue 14.5
SECOND_PASS = tuple(f"ctx_init+{v}" for v in ("depth2", "n_ctx1", "d_s16", "factor_noise", "factor_per_layer",
                                              "factor_frozen", "one_group", "task_only", "sum", "warmup200")) + ("n_ctx4",)
FIRST_PASS = ("base", "ctx_init", "init0", "sum", "shallow", "one_group", "lr0.005")


def variant_recipe(name: str, split: str, seeds: tuple[int, ...], base=None):
    from clipheads.training.protocols.recipes import load_recipe

    base = base or load_recipe(BASE_RECIPE)
    parts = [VARIANTS[v] for v in name.split("+")]  # "ctx_init+sum": both changes
    method_config, train = dict(base.method_config), dict(base.train)
    for mc, tr, _ in parts:
        method_config.update(mc)
        train.update(tr)
    method_config = {k: v for k, v in method_config.items() if v is not None}
    return replace(base, name=f"{split}_{name}", eval_split=split, seeds=seeds, method_config=method_config,
                   train=train, description=f"MmAP study variant {name} ({split})")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run(recipe, world: str, out: str) -> str:
    from clipheads.training.protocols.runner import run_recipe

    run_recipe(recipe, world, out, device="cpu", progress=False, log=lambda s: print(s, flush=True))
    return recipe.name


def run_many(recipes, world: str, out: Path, jobs: int) -> None:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futs = [pool.submit(_run, r, world, str(out)) for r in recipes]
        for f in as_completed(futs):
            print(f"finished {f.result()}", flush=True)


# ---- init diagnosis: accuracy of the untrained head, per seed -----------------------------------
INIT_VARIANTS = ("base", "ctx_init", "init0")
GROUPS = [[0, 1, 3], [2]]  # {photo, clipart, painting} + {sketch}: what grouping picked for every seed


def init_diagnosis(world: str, seeds: list[int]) -> dict:
    """Val top-1 of the untrained MmAP head (prompts at their init) per seed, against zero-shot:
    how far, and how seed-dependently, each init moves CLIP before training starts."""
    import torch

    from clipheads.training.backbone import load_backbone
    from clipheads.training.data.synth import load_world_splits
    from clipheads.training.grouping import assign_groups
    from clipheads.training.loop import evaluate, seed_everything
    from clipheads.training.methods import TaskSpec, build_method

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bb = load_backbone("clipheads-tiny", "clipheads")
    domains = ("photo", "clipart", "sketch", "painting")
    splits = [load_world_splits(world, d) for d in domains]
    tasks = list(assign_groups([TaskSpec(d, s.classnames, s.templates) for d, s in zip(domains, splits)], GROUPS))
    zs = build_method("zeroshot", bb, tasks, {})
    out = {"zeroshot": {d: evaluate(zs, s.val, task=i, batch_size=256)["top1"] for i, (d, s) in enumerate(zip(domains, splits))}}
    for v in INIT_VARIANTS:
        cfg = variant_recipe(v, "val", (1,)).method_config
        out[v] = {}
        for seed in seeds:
            seed_everything(seed)
            head = build_method("mmap", bb, tasks, cfg)
            out[v][str(seed)] = {d: evaluate(head, s.val, task=i, batch_size=256)["top1"]
                                 for i, (d, s) in enumerate(zip(domains, splits))}
            print(v, seed, out[v][str(seed)], flush=True)
    return out


# ---- table --------------------------------------------------------------------------------------
def _units(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("mt_s*.json"))]


def _fmt(xs: list[float]) -> str:
    m = 100 * statistics.mean(xs)
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ± {100 * statistics.pstdev(xs):.1f}"


def vitb16_count(method_config: dict, n_tasks: int = 4, n_groups: int = 2) -> int:
    """Trainable parameters of this variant's shape on ViT-B/16 (D_t 512, D_v 768, 12 blocks) with
    the ViT-B/16 defaults for the token count and width (the tiny world's n=2, d_s=32 are scaled
    down; depth, combine and the instance layout carry over). Formula of mmap.py's docstring."""
    from clipheads.training.methods.mmap import MmAPConfig

    c = MmAPConfig.from_dict({k: v for k, v in method_config.items() if k not in ("n_ctx", "source_dim", "depth",
                                                                               "text_suffix", "ctx_init")})
    depth = 11 if method_config.get("depth", 11) >= 4 else method_config["depth"]  # tiny's 4 = "all blocks"
    d_s = c.source_dim or 256
    groups = (method_config.get("n_groups") or n_groups) if c.group_shared else 0
    instances = groups + (n_tasks if c.task_specific else 0)
    rows = depth if c.factor_per_layer else 1
    return instances * (depth * c.n_ctx * d_s + rows * (512 // d_s + 768 // d_s))


def table(out: Path) -> None:
    from clipheads.training.protocols.recipes import load_recipe

    rows = {"val": [], "test": []}
    maple = REPO / "bench" / "methods_synthetic" / "runs" / "synth_maple_multitask"  # MaPLe-MT, same machine and split
    for split, name, run_dir in [(*d.name.split("_", 1), d) for d in sorted((out / "runs").glob("*_*"))] + [
            ("test", "MaPLe-MT (bench/methods_synthetic)", maple)]:
        units = [u for u in _units(run_dir) if "config" in u]
        if split not in rows or not units:
            continue
        means = [u["mean"] for u in units]
        per_task = {t: [u["per_task"][t] for u in units] for t in units[0]["per_task"]}
        rows[split].append({
            "variant": name, "seeds": [u["seed"] for u in units], "mean": statistics.mean(means),
            "std": statistics.pstdev(means) if len(means) > 1 else None, "per_seed_mean": means,
            "per_task": {t: statistics.mean(v) for t, v in per_task.items()},
            "per_task_std": {t: statistics.pstdev(v) for t, v in per_task.items()} if len(units) > 1 else None,
            "groupings": [u.get("grouping", {}).get("groups") for u in units],
            "first_loss": [u.get("first_loss") for u in units], "final_loss": [u.get("final_loss") for u in units],
            "trainable_tiny": units[0]["trainable_parameters"], "method": units[0]["method"],
            "trainable_vitb16": vitb16_count(units[0]["config"]["method_config"]) if units[0]["method"] == "mmap" else None,
            "train_time_s": [u.get("train_time_s") for u in units],
            "_md": [_fmt(means)] + [_fmt(v) for v in per_task.values()],
        })
    init = json.loads((out / "init.json").read_text()) if (out / "init.json").exists() else None
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "note": "2 CPU cores shared with ~4 other engineers' jobs; runs under nice -n 10, fp32 on the CPU"},
               "base_recipe": load_recipe(BASE_RECIPE).to_json(), "variants": {k: {"method_config": v[0], "train": v[1], "why": v[2]}
                                                                          for k, v in VARIANTS.items()},
               "val": [{k: v for k, v in r.items() if k != "_md"} for r in rows["val"]],
               "test": [{k: v for k, v in r.items() if k != "_md"} for r in rows["test"]], "init": init}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    lines = ["# MmAP design study (synthetic world, 4-domain multi-task, tiny CLIP)", "",
             "Generated by `python bench/mmap_study/study.py table` from `runs/`; commands in `commands.txt`; "
             "the reading is in README.md here.", "",
             f"Machine: {payload['machine']['platform']}, {os.cpu_count()} CPU cores shared with other jobs (nice -n 10), fp32.", ""]
    for split, title in (("val", "Validation split (selection), seed 1 unless stated"), ("test", "Test split, 3 seeds (mean ± std over seeds)")):
        if not rows[split]:
            continue
        names = list(rows[split][0]["per_task"])
        lines += [f"## {title}", "", "| variant | method | mean | " + " | ".join(names) + " | trainable (tiny) | ViT-B/16 shape | groupings |",
                  "|---|---|---:|" + "---:|" * len(names) + "---:|---:|---|"]
        for r in sorted(rows[split], key=lambda r: -r["mean"]):
            groups = sorted({json.dumps(g) for g in r["groupings"] if g}) or ["-"]
            vit = f"{r['trainable_vitb16']:,}" if r["trainable_vitb16"] else "-"
            lines.append(f"| `{r['variant']}` | {r['method']} | " + " | ".join(r["_md"]) + f" | {r['trainable_tiny']:,} | {vit} | "
                         + "; ".join(groups).replace('"', "") + " |")
        lines.append("")
    if init:
        lines += ["## Init diagnosis: val top-1 of the untrained head (no training), per seed", "",
                  "| init | " + " | ".join(f"seed {s}" for s in next(iter(v for k, v in init.items() if k != "zeroshot"))) + " | std |",
                  "|---|" + "---:|" * (1 + len(next(iter(v for k, v in init.items() if k != "zeroshot")))), ]
        zs = statistics.mean(init["zeroshot"].values())
        lines.append("| zero-shot CLIP | " + " | ".join(f"{100 * zs:.1f}" for _ in next(iter(v for k, v in init.items() if k != "zeroshot"))) + " | 0 |")
        for k, per_seed in init.items():
            if k == "zeroshot":
                continue
            ms = [statistics.mean(d.values()) for d in per_seed.values()]
            lines.append(f"| `{k}` | " + " | ".join(f"{100 * m:.1f}" for m in ms) + f" | {100 * statistics.pstdev(ms):.1f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=("init", "val", "test", "maple", "table"))
    ap.add_argument("--world", default="runs/world-s1")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--split", default="test", choices=("val", "test"), help="maple: the split to score")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    if args.phase == "table":
        table(out)
    elif args.phase == "init":
        (out / "init.json").write_text(json.dumps(init_diagnosis(args.world, args.seeds or [1, 2, 3, 4, 5]), indent=2))
    elif args.phase == "maple":  # the MaPLe-MT reference on the same machine, split and seeds
        from clipheads.training.protocols.recipes import load_recipe

        base = load_recipe("synth_maple_multitask")
        seeds = tuple(args.seeds or (1, 2, 3))
        run_many([replace(base, name=f"{args.split}_maple", eval_split=args.split, seeds=(s,)) for s in seeds],
                 args.world, out, args.jobs)
    else:
        names = args.variants or (list(FIRST_PASS) if args.phase == "val" else ["base"])
        seeds = tuple(args.seeds or ((1,) if args.phase == "val" else (1, 2, 3)))
        recipes = [variant_recipe(n, args.phase, seeds) for n in names]
        if args.jobs > 1 and args.phase == "test":  # one process per (variant, seed): units of a recipe run in order
            recipes = [replace(r, seeds=(s,)) for r in recipes for s in seeds]
        run_many(recipes, args.world, out, args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
