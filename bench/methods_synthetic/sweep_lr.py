"""Learning-rate sweep for the synthetic-world recipes, selected on the VALIDATION split.

    python bench/methods_synthetic/sweep_lr.py --world runs/world-s1 [--device cuda] [--jobs 8]
        [--methods coop vpt ...] [--lrs 0.002 0.005 0.01 0.02 0.05] [--seeds 1 2] [--out bench/methods_synthetic]

For each method, its `synth_<method>_heldout` recipe (16 shots on the held-out `sketch` domain of
the tiny CLIP) is trained at every learning rate and scored on the world's full `val` split of that
domain (never on test). Writes sweep_lr.json and sweep_lr.md; the chosen lr per method is the best
mean val top-1. `--apply` writes it into the method's synth_<method>_{heldout,base2novel,multitask}
recipes (the other protocols reuse the held-out choice: one lr per method, no per-protocol search).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

METHODS = ("coop", "cocoop", "vpt", "ivlp", "maple", "mma", "comma", "mmap")


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def one(method: str, lr: float, seed: int, world: str, device: str) -> dict:
    from clipheads.training.backbone import load_backbone
    from clipheads.training.data.fewshot import few_shot_splits
    from clipheads.training.data.synth import load_world_splits
    from clipheads.training.loop import TrainConfig, evaluate, train_head
    from clipheads.training.methods import TaskSpec, build_method
    from clipheads.training.protocols.recipes import load_recipe

    recipe = load_recipe(f"synth_{method}_heldout")
    domain = recipe.datasets[0].kwargs["domain"]
    bb = load_backbone(recipe.backbone["arch"], recipe.backbone.get("pretrained"), device=device)
    s = load_world_splits(world, domain)
    task = [TaskSpec(domain, s.classnames, s.templates)]
    head = build_method(method, bb, task, recipe.method_config)
    cfg = replace(TrainConfig(**dict(recipe.train)), lr=lr, seed=seed, device=device, progress=False)
    train_head(head, {0: few_shot_splits(s, 16, seed).train}, cfg)
    return {"method": method, "lr": lr, "seed": seed, "val_top1": evaluate(head, s.val, device=device)["top1"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.002, 0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--apply", action="store_true", help="write the chosen lr into the synth_* recipes")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    jobs = [(m, lr, s) for m in args.methods for lr in args.lrs for s in args.seeds]
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                             initargs=(max(1, (os.cpu_count() or 1) // args.jobs),)) as pool:
        futs = [pool.submit(one, m, lr, s, args.world, args.device) for m, lr, s in jobs]
        for f in as_completed(futs):
            rows.append(f.result())
            r = rows[-1]
            print(f"{r['method']:7s} lr {r['lr']:<6} seed {r['seed']}: val {r['val_top1']:.1%}", flush=True)
    table = {}
    for r in rows:
        table.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["val_top1"])
    best = {m: max(v, key=lambda lr: sum(v[lr]) / len(v[lr])) for m, v in table.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_lr.json").write_text(json.dumps({"rows": rows, "best": best, "argv": sys.argv[1:]}, indent=1))
    lrs = sorted(args.lrs)
    md = ["# Learning-rate sweep (16-shot, held-out `sketch` domain, scored on the val split)", "",
          f"Seeds {args.seeds}; mean val top-1 per lr; **bold** = chosen. Command: "
          f"`python bench/methods_synthetic/sweep_lr.py {' '.join(sys.argv[1:])}`", "",
          "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in args.methods:
        cells = []
        for lr in lrs:
            v = table.get(m, {}).get(lr)
            txt = f"{100 * sum(v) / len(v):.1f}" if v else "-"
            cells.append(f"**{txt}**" if lr == best.get(m) else txt)
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    if args.apply:
        from clipheads.training.protocols.recipes import RECIPE_DIR

        for m, lr in best.items():
            for path in sorted(RECIPE_DIR.glob(f"synth_{m}_*.json")):
                data = json.loads(path.read_text())
                data["train"]["lr"] = lr
                path.write_text(json.dumps(data, indent=2) + "\n")
        md += ["", "Applied to the `synth_<method>_*` recipes (one lr per method)."]
    (out / "sweep_lr.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
