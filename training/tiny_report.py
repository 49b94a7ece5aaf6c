"""The packaged tiny CLIP's report and model card: zero-shot per domain and attribute on a world,
seen vs held-out combinations, and the few-shot gain a CoOp head recovers on the held-out domain.

    python -m clipheads.training.pretrain report --weights training/weights/clipheads-tiny.safetensors \
        --out bench/tiny_clip --run runs/tiny-s0 --card training/weights/MODEL_CARD.md

Pretraining itself (data, loss, loop, finalize) is `pretrain.py`; this module only reads its weights.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .data import synth
from .pretrain import (ARCH, CONFIG_DIR, WEIGHTS_DIR, ZS_TEMPLATE, _article, _write_json, accuracy_table,
                       holdout_combos, load_tiny, register_tiny_config, text_features)


def _attr_prompt(domain: str, size: str, colour: str, classname: str) -> str:
    return f"a {synth.DOMAIN_WORDS[domain]} of {_article(size)} {size} {colour} {classname.replace('_', ' ')}."


@torch.no_grad()
def evaluate_world(model: nn.Module, tokenizer, preprocess, world: Path, split: str = "test") -> dict:
    """Zero-shot and attribute diagnosis on one split of an on-disk world (captions give the attributes)."""
    from PIL import Image

    rows = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == split]
    feats = []
    for i in range(0, len(rows), 256):
        batch = torch.stack([preprocess(Image.open(world / r["path"])) for r in rows[i:i + 256]])
        feats.append(model.encode_image(batch, normalize=True))
    img = torch.cat(feats)
    colours, sizes = list(synth.COLOURS), list(synth.SIZES)
    attrs = torch.tensor([[synth.DOMAINS.index(r["domain"]), synth.CLASSES.index(r["class"]), colours.index(r["colour"]),
                           sizes.index(r["size"])] for r in rows])
    cls_txt = text_features(model, tokenizer, [ZS_TEMPLATE.format(c.replace("_", " ")) for c in synth.CLASSES])
    zs = accuracy_table((img @ cls_txt.t()).argmax(1), attrs)
    # Attribute diagnosis: the full caption with only one attribute varied, the others true.
    all_prompts = {(d, s, k, c): None for d in synth.DOMAINS for s in sizes for k in colours for c in synth.CLASSES}
    keys = list(all_prompts)
    txt = text_features(model, tokenizer, [_attr_prompt(*k) for k in keys])
    index = {k: i for i, k in enumerate(keys)}
    diag = {}
    for name, pos, values in (("shape", 1, synth.CLASSES), ("colour", 2, colours), ("size", 3, sizes), ("style", 0, synth.DOMAINS)):
        correct = []
        for f, r in zip(img, rows):
            true = [r["domain"], r["size"], r["colour"], r["class"]]
            slot = {0: 0, 1: 3, 2: 2, 3: 1}[pos]  # attribute index -> position in the prompt key
            cands = [tuple(true[:slot] + [v] + true[slot + 1:]) for v in values]
            scores = txt[[index[c] for c in cands]] @ f
            correct.append(values[int(scores.argmax())] == true[slot])
        diag[name] = _by_domain(torch.tensor(correct, dtype=torch.float), attrs, chance=1 / len(values))
    return {"split": split, "n_images": len(rows), "chance": round(1 / len(synth.CLASSES), 4), "zero_shot": zs, "attribute_diagnosis": diag}


def _by_domain(correct: Tensor, attrs: Tensor, chance: float) -> dict:
    held = holdout_combos()
    is_held = torch.tensor([(synth.DOMAINS[d], synth.CLASSES[c]) in held for d, c in attrs[:, :2].tolist()])
    out = {"chance": round(chance, 4), "all": round(correct.mean().item(), 4), "seen": round(correct[~is_held].mean().item(), 4),
           "held_out": round(correct[is_held].mean().item(), 4)}
    for di, d in enumerate(synth.DOMAINS):
        out[d] = round(correct[attrs[:, 0] == di].mean().item(), 4)
    return out


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "report.json", result)
    (out / "README.md").write_text(report_markdown(result))


def report_markdown(r: dict) -> str:
    zs, diag = r["zero_shot"], r["attribute_diagnosis"]
    lines = [
        "# clipheads-tiny: zero-shot report",
        "",
        f"Regenerate: `{r['command']}`",
        "",
        f"Weights `{r['weights']}` (sha256 `{r['sha256'][:16]}…`), world seed {r['world_seed']} ({r['world_size']}), "
        f"split `{r['split']}`, {r['n_images']} images, template `{ZS_TEMPLATE}`, {len(synth.CLASSES)}-way, "
        f"chance {r['chance']:.1%}.",
        "",
        "Held out at pretraining: " + r["holdout_text"],
        "",
        "## Zero-shot top-1 per domain",
        "",
        "| domain | all | seen combos | held-out combos |",
        "|---|---|---|---|",
    ]
    for d in synth.DOMAINS:
        row = zs[d]
        lines.append(f"| {d} | {row['all']:.1%} | {row.get('seen', row['all']):.1%} | "
                     + (f"{row['held_out']:.1%}" if "held_out" in row else "–") + " |")
    lines += [f"| **all** | {zs['all']:.1%} | {zs['seen']:.1%} | {zs['held_out']:.1%} |", "",
              "## Attribute diagnosis",
              "",
              "Prompt `a {style} of a {size} {colour} {class}.` with every attribute true except the one varied.",
              "",
              "| attribute | chance | all | seen | held-out | " + " | ".join(synth.DOMAINS) + " |",
              "|---|---|---|---|---|" + "---|" * len(synth.DOMAINS)]
    for name, row in diag.items():
        lines.append(f"| {name} | {row['chance']:.1%} | {row['all']:.1%} | {row['seen']:.1%} | {row['held_out']:.1%} | "
                     + " | ".join(f"{row[d]:.1%}" for d in synth.DOMAINS) + " |")
    if r.get("coop_heldout"):
        lines += ["", *coop_markdown(r["coop_heldout"])]
    if r.get("training"):
        t = r["training"]
        lines += ["", "## Training", "", f"{t.get('steps_done')} steps, {t.get('wall_s', 0) / 60:.1f} min wall "
                  f"(+{t.get('pool_s', 0) / 60:.1f} min rendering the image pool) on 2 shared CPU cores."]
    return "\n".join(lines) + "\n"


def coop_markdown(c: dict) -> list[str]:
    runs = ", ".join(f"seed {x['seed']}: {x['top1']:.1%}" for x in c["runs"])
    return [f"## {c['shots']}-shot CoOp on the held-out domain `{c['domain']}`", "",
            f"Recipe `{c['recipe']}` ({c['method_config']}, {c['train'].get('epochs')} epochs, lr {c['train'].get('lr')}, "
            f"crop scale {c['train'].get('crop_scale')}); {c['n_test']} test images.", "",
            "| | top-1 |", "|---|---|",
            f"| zero-shot | {c['zero_shot']:.1%} |",
            f"| CoOp, mean ± std over {len(c['runs'])} seeds | {c['mean']:.1%} ± {100 * c['std']:.1f} |",
            f"| gain | **{c['gain_points']:+.1f} points** |", "", f"Per seed: {runs}."]


def holdout_text() -> str:
    held = holdout_combos()
    sk = [c for d, c in sorted(held) if d == "sketch"]
    pa = [c for d, c in sorted(held) if d == "painting"]
    return (f"`sketch` images of {len(sk)} of {len(synth.CLASSES)} classes ({', '.join(sk)}); "
            f"`painting` images of {', '.join(pa)}. Those (domain, class) combinations were never rendered for pretraining.")


def coop_gain(weights: Path, world: Path, seeds: Sequence[int] = (1, 2, 3)) -> dict:
    """Few-shot CoOp on the held-out domain vs zero-shot: the methods table's `synth_coop_heldout`
    and `synth_zeroshot_heldout` recipes, run by the protocol runner on `world`, one run per seed."""
    import tempfile

    from .backbone import load_backbone
    from .protocols.recipes import load_recipe
    from .protocols.runner import run_recipe

    bb = load_backbone(ARCH, str(weights))
    coop = replace(load_recipe("synth_coop_heldout"), seeds=tuple(seeds))
    zero = replace(load_recipe("synth_zeroshot_heldout"), seeds=tuple(seeds[:1]))
    quiet = dict(backbone=bb, progress=False, log=lambda line: None)
    with tempfile.TemporaryDirectory() as tmp:
        zs = run_recipe(zero, world, tmp, **quiet)[0]["top1"]
        results = run_recipe(coop, world, tmp, **quiet)
    domain = coop.datasets[0].kwargs["domain"]
    runs = [{"seed": r["seed"], "top1": round(r["top1"], 4), "train_s": r["train_time_s"]} for r in results]
    accs = np.array([r["top1"] for r in runs])
    return {"domain": domain, "shots": coop.shots[0], "recipe": coop.name, "method_config": dict(coop.method_config),
            "train": dict(coop.train), "n_test": len(synth.load_world_splits(world, domain).test),
            "zero_shot": round(zs, 4), "runs": runs, "mean": round(float(accs.mean()), 4),
            "std": round(float(accs.std()), 4), "gain_points": round(100 * float(accs.mean() - zs), 1)}


def report(weights: Path, out: Path, world: Path | None = None, world_seed: int = 0, world_size: str = "full",
           run_dir: Path | None = None, coop_seeds: Sequence[int] = (1, 2, 3)) -> dict:
    import tempfile

    torch.set_num_threads(2)
    from .files import file_sha256

    model, tokenizer, preprocess = load_tiny(weights)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(world or synth.generate_world(Path(tmp) / "world", seed=world_seed, size=world_size, progress=True))
        desc = json.loads((root / "world.json").read_text())
        world_seed, world_size = desc["seed"], desc["size"]
        result = evaluate_world(model, tokenizer, preprocess, root)
        if coop_seeds:
            result["coop_heldout"] = coop_gain(weights, root, coop_seeds)
    cmd = (f"python -m clipheads.training.pretrain report --weights {weights} --out {out}" + (f" --world {world}" if world else "")
           + (f" --run {run_dir}" if run_dir else "") + ("" if tuple(coop_seeds) == (1, 2, 3) else
                                                          f" --coop-seeds '{','.join(map(str, coop_seeds))}'"))
    result.update({"weights": str(weights), "sha256": file_sha256(weights), "world_seed": world_seed, "world_size": world_size,
                   "command": cmd, "holdout_text": holdout_text(), "holdout": sorted(map(list, holdout_combos()))})
    if run_dir and (run_dir / "summary.json").exists():
        result["training"] = json.loads((run_dir / "summary.json").read_text())
    write_report(result, out)
    return result


def model_card(r: dict, run: dict | None) -> str:
    """MODEL_CARD.md from a report (and the pretraining run's config/summary when given)."""
    import open_clip

    register_tiny_config()
    arch = json.loads((CONFIG_DIR / f"{ARCH}.json").read_text())
    n_params = sum(p.numel() for p in open_clip.create_model(ARCH, pretrained=None).parameters())
    zs = r["zero_shot"]
    cfg = (run or {}).get("config", {}).get("config", {})
    summ = (run or {}).get("summary", {})
    lines = [
        f"# {ARCH}: a tiny CLIP pretrained on the synthetic world",
        "",
        "A from-scratch open_clip CLIP (standard ViT image tower of `ResidualAttentionBlock`s, standard CLIP text",
        f"transformer, open_clip tokenizer, vocabulary 49408, context {arch['text_cfg']['context_length']}) with "
        f"{n_params / 1e6:.2f} M parameters, shipped so that demos and tests show real learning offline.",
        "It has never seen a real image: it knows the 32 drawn object classes, 10 colours, 3 sizes and 4 styles of",
        "`training/data/synth.py` and nothing else. Do not use it for anything but this package's demos and tests.",
        "",
        "## Files",
        "",
        f"* `{ARCH}.safetensors` — the full open_clip state dict, float16 (loads into fp32 models), sha256 in `{ARCH}.sha256`:",
        f"  `{r['sha256']}`.",
        f"* architecture `training/model_configs/{ARCH}.json`: `{json.dumps(arch)}`",
        "",
        "```python",
        "from clipheads.training.pretrain import register_tiny_config  # or clipheads.training.backbone.load_backbone()",
        "register_tiny_config()",
        f"model = open_clip.create_model(\"{ARCH}\", pretrained=\"training/weights/{ARCH}.safetensors\")  # no network",
        "```",
        "",
        "Preprocessing is open_clip's default for the config: resize to 48 px (bicubic), centre crop, CLIP mean/std.",
        "",
        "## How it was made",
        "",
        "```",
        "OMP_WAIT_POLICY=PASSIVE python -m clipheads.training.pretrain --out runs/tiny-s0 --pool-cache runs/pool-cache --seed 0",
        "python -m clipheads.training.pretrain finalize --ckpt runs/tiny-s0/last.safetensors",
        f"python -m clipheads.training.pretrain report --weights training/weights/{ARCH}.safetensors --out bench/tiny_clip \\",
        "    --run runs/tiny-s0 --card training/weights/MODEL_CARD.md",
        "```",
        "",
        "* Data: images rendered on the fly by `synth.render` (generator version "
        f"{synth.GENERATOR_VERSION}) at 64 px and resized to 48 px, {cfg.get('per_combo', '?')} per allowed "
        "(domain, class, colour), seed space `(1000 + seed, …)` disjoint from the on-disk worlds; random flips and ±3 px shifts.",
        "* Held out (never rendered for pretraining): " + holdout_text(),
        "* Batches: groups of 32 images sharing one (domain, colour), every image a different class, so negatives",
        f"  differ by shape; {cfg.get('mixed_groups', 0.25):.0%} of groups drawn at random. Batch {cfg.get('batch_size', '?')}.",
        "* Captions: 40 % class-only templates (`a photo of a star.`), 15 % colour + class, 15 % style + class,",
        "  30 % full (`a sketch of a small red star.`); plus the class prompt of every class in every batch.",
        "* Loss: symmetric multi-positive InfoNCE (a caption is a positive for every image it truly describes) plus",
        f"  an auxiliary cosine classifier on image features (weight {cfg.get('aux_class_weight', '?')}, discarded).",
        f"* AdamW lr {cfg.get('lr', '?')}, wd {cfg.get('weight_decay', '?')}, betas (0.9, 0.98), warm-up {cfg.get('warmup', '?')} steps, "
        + (f"cosine to 0 over {cfg.get('steps', '?')} steps." if not cfg.get("minutes") else
           f"cosine to 0 over min({cfg.get('steps', '?')} steps, {cfg.get('minutes')} min)."),
    ]
    if summ:
        pool = summ.get("pool_s", 0) / 60
        lines.append(f"* Ran {summ.get('steps_done')} steps in {summ.get('wall_s', 0) / 60:.1f} min "
                     + (f"(+{pool:.1f} min rendering the image pool) " if pool >= 0.05 else "(image pool from the cache) ")
                     + f"on 2 CPU cores; torch threads {cfg.get('threads', 2)}.")
        if cfg.get("minutes"):
            lines.append("  The wall-clock budget decided the step count, so an exact rerun is "
                         f"`--steps {summ.get('steps_done')} --minutes 0` (a slightly different lr curve).")
        else:
            lines.append("  The step count is fixed (no wall-clock budget): the command above reruns it exactly "
                         "(same data, init and batches; CPU float arithmetic may differ across machines).")
    lines += ["", "## Zero-shot accuracy", "",
              f"World seed {r['world_seed']} ({r['world_size']}), `{r['split']}` split, {r['n_images']} images, "
              f"template `{ZS_TEMPLATE}`, {len(synth.CLASSES)}-way, chance {r['chance']:.1%}.", "",
              "| domain | all | seen combos | held-out combos |", "|---|---|---|---|"]
    for d in synth.DOMAINS:
        row = zs[d]
        lines.append(f"| {d} | {row['all']:.1%} | {row.get('seen', row['all']):.1%} | "
                     + (f"{row['held_out']:.1%}" if "held_out" in row else "–") + " |")
    lines += [f"| **all** | {zs['all']:.1%} | {zs['seen']:.1%} | {zs['held_out']:.1%} |", "",
              "Attribute diagnosis and the full table: `bench/tiny_clip/README.md`.", "",
              *(coop_markdown(r["coop_heldout"]) + [""] if r.get("coop_heldout") else []),
              "## Limitations", "",
              "* Synthetic, low-resolution, 32 classes: features are useful only inside this world.",
              "* The held-out combinations are deliberately weaker: that gap is what few-shot heads are meant to close.",
              ]
    return "\n".join(lines) + "\n"


def report_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clipheads.training.pretrain report")
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR / f"{ARCH}.safetensors")
    p.add_argument("--out", type=Path, default=Path("bench/tiny_clip"))
    p.add_argument("--world", type=Path, default=None, help="an existing world (default: generate seed 0, full, in a temp dir)")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--world-size", choices=sorted(synth.WORLD_SIZES), default="full")
    p.add_argument("--run", type=Path, default=None, help="pretraining run directory (adds its summary)")
    p.add_argument("--card", type=Path, default=None, help="also write the model card here")
    p.add_argument("--coop-seeds", default="1,2,3", help="seeds of the held-out-domain CoOp runs ('' to skip)")
    a = p.parse_args(argv)
    seeds = tuple(int(x) for x in a.coop_seeds.split(",") if x.strip())
    r = report(a.weights, a.out, a.world, a.world_seed, a.world_size, a.run, seeds)
    if a.card:
        run = None
        if a.run:
            run = {name: json.loads((a.run / f"{name}.json").read_text()) for name in ("config", "summary") if (a.run / f"{name}.json").exists()}
        a.card.write_text(model_card(r, run))
    zs = r["zero_shot"]
    print(f"zero-shot top-1: seen {zs['seen']:.1%}, held-out {zs['held_out']:.1%} (chance {r['chance']:.1%}); "
          + ", ".join(f"{d} {zs[d]['all']:.1%}" for d in synth.DOMAINS) + f"; wrote {a.out}/README.md and report.json")
    return 0


