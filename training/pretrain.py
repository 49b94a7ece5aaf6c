"""Contrastive pretraining of `clipheads-tiny` on the synthetic world, and its report.

    OMP_WAIT_POLICY=PASSIVE python -m clipheads.training.pretrain --out runs/tiny-s0 --pool-cache runs/pool-cache --seed 0
    python -m clipheads.training.pretrain finalize --ckpt runs/tiny-s0/last.safetensors        # fp16 weights + sha256
    python -m clipheads.training.pretrain report --weights training/weights/clipheads-tiny.safetensors \
        --out bench/tiny_clip --run runs/tiny-s0 --card training/weights/MODEL_CARD.md

Why it is built this way (a first try with plain CLIP batches learned colour and style but not
shape, because random in-batch negatives almost never differ by shape alone):

* Batches are made of groups that share one (domain, colour); inside a group every image is a
  different class, so the negatives a caption must beat differ by shape (and size) only.
* The loss is multi-positive (UniCL-style): a caption is a positive for *every* image it truly
  describes ("a photo of a star." describes all stars), so class-level captions are not punished
  as false negatives. Every batch also carries the class-only prompt of every class.
* Captions mix class-only templates with partial and full attribute captions, so the text tower
  learns class words strongly while still reading domain, colour and size.
* Images are rendered once into a uint8 pool in RAM (two processes), then shifted/flipped per step.

Held out at pretraining time (HOLDOUT): half the classes never appear as `sketch`, and a few
classes never appear as `painting`. Zero-shot is good on seen combinations and weaker on those,
which leaves few-shot tuning something to recover.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import synth
from .files import apply_umask

ARCH = "clipheads-tiny"
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ZS_TEMPLATE = "a photo of a {}."
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN/STD (its default preprocess)
STD = (0.26862954, 0.26130258, 0.27577711)
ATTRS = ("domain", "classname", "colour", "size")


def register_tiny_config() -> None:
    """Make `clipheads-tiny` known to open_clip (idempotent)."""
    import open_clip

    if ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


# ----------------------------------------------------------------------------- what is held out

HELD_OUT_DOMAIN = "sketch"  # the domain whose style the tiny CLIP saw only for half the classes


def holdout_combos() -> frozenset[tuple[str, str]]:
    """(domain, class) pairs never rendered during pretraining."""
    sketch = {(HELD_OUT_DOMAIN, c) for i, c in enumerate(synth.CLASSES) if i % 2 == 1}          # 16 of 32 classes
    painting = {("painting", c) for i, c in enumerate(synth.CLASSES) if i % 8 == 2}      # 4 classes
    return frozenset(sketch | painting)


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    steps: int = 7000
    batch_size: int = 128
    group_size: int = 32          # images per (domain, colour) group; every one a different class
    mixed_groups: float = 0.25    # fraction of groups drawn at random instead (nuisance diversity)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 150
    per_combo: int = 36           # pool images per allowed (domain, class, colour)
    world_image_size: int = 64    # rendered like the on-disk world, then resized like open_clip preprocess
    aux_class_weight: float = 1.0  # auxiliary cosine classifier on image features (discarded after)
    eval_every: int = 250
    eval_per_combo: int = 4       # eval images per (domain, class), from a disjoint seed
    minutes: float = 0.0          # wall-clock budget (0 = none): the cosine anneals to 0 when it ends
    threads: int = 2              # with OMP_WAIT_POLICY=PASSIVE: busy-waiting threads collapse on shared cores
    captions_per_batch: int = 48  # image captions encoded per step, besides the class prompts (text cost)


# ----------------------------------------------------------------------------- image pool

@dataclass(frozen=True)
class Pool:
    images: Tensor      # (N, 3, S, S) uint8
    attrs: Tensor       # (N, 4) int64: domain, class, colour, size indices


def _render_one(job: tuple[str, str, str, tuple[int, ...], int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    from PIL import Image

    domain, cls, colour, seed, world_size, model_size = job
    inst = synth.sample_instance(domain, cls, seed)
    inst = replace(inst, colour=colour) if colour else inst
    img = synth.render(inst, world_size).resize((model_size, model_size), Image.BICUBIC)
    key = (synth.DOMAINS.index(domain), synth.CLASSES.index(cls), list(synth.COLOURS).index(inst.colour),
           list(synth.SIZES).index(inst.size))
    return np.asarray(img, np.uint8).transpose(2, 0, 1).copy(), key


def render_pool(jobs: list, workers: int = 2, desc: str = "pool") -> Pool:
    from tqdm import tqdm

    imgs, keys = [], []
    with ProcessPoolExecutor(workers) as ex:
        for arr, key in tqdm(ex.map(_render_one, jobs, chunksize=128), total=len(jobs), desc=desc, unit="img", mininterval=5):
            imgs.append(arr)
            keys.append(key)
    return Pool(torch.from_numpy(np.stack(imgs)), torch.tensor(keys, dtype=torch.long))


def train_jobs(cfg: PretrainConfig, model_size: int) -> list:
    held = holdout_combos()
    jobs = []
    for d in synth.DOMAINS:
        for ci, c in enumerate(synth.CLASSES):
            if (d, c) in held:
                continue
            for ki, k in enumerate(synth.COLOURS):
                for i in range(cfg.per_combo):
                    # seed space (1000 + seed, ...) never overlaps the on-disk worlds' (seed, ...)
                    jobs.append((d, c, k, (1000 + cfg.seed, synth.DOMAINS.index(d), ci, ki, i), cfg.world_image_size, model_size))
    return jobs


def eval_jobs(per_combo: int, seed: int, world_size: int, model_size: int) -> list:
    return [(d, c, "", (50_000 + seed, synth.DOMAINS.index(d), ci, i), world_size, model_size)
            for d in synth.DOMAINS for ci, c in enumerate(synth.CLASSES) for i in range(per_combo)]


def normalize(images: Tensor) -> Tensor:
    x = images.float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: Tensor, gen: torch.Generator, shift: int = 3) -> Tensor:
    """Random flips and small shifts (replicate-padded) of a uint8 batch."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images.float(), (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]).to(torch.uint8)


# ----------------------------------------------------------------------------- captions and batches

@dataclass(frozen=True)
class Caption:
    text: str
    attrs: tuple[tuple[str, int], ...]   # the attributes the text commits to, as (name, index)


_GENERIC = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture of a {}.")


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def sample_caption(key: Sequence[int], rng: random.Random) -> Caption:
    """One caption for an image with attribute indices `key` (domain, class, colour, size)."""
    d, c, k, s = (int(v) for v in key)
    name = synth.CLASSES[c].replace("_", " ")
    colour, size, dword = list(synth.COLOURS)[k], list(synth.SIZES)[s], synth.DOMAIN_WORDS[synth.DOMAINS[d]]
    u = rng.random()
    if u < 0.40:
        return Caption(rng.choice(_GENERIC).format(name), (("classname", c),))
    if u < 0.55:
        return Caption(f"a photo of {_article(colour)} {colour} {name}.", (("classname", c), ("colour", k)))
    if u < 0.70:
        # "a photo of a star." is also the generic template, so for photos it commits to the class only.
        attrs = (("classname", c),) if dword == "photo" else (("classname", c), ("domain", d))
        return Caption(f"a {dword} of {_article(name)} {name}.", attrs)
    return Caption(f"a {dword} of {_article(size)} {size} {colour} {name}.",
                   (("classname", c), ("domain", d), ("colour", k), ("size", s)))


def class_prompts() -> list[Caption]:
    return [Caption(ZS_TEMPLATE.format(c.replace("_", " ")), (("classname", i),)) for i, c in enumerate(synth.CLASSES)]


def positives(keys: Tensor, captions: Sequence[Caption]) -> Tensor:
    """(N_img, N_txt) bool: caption j truly describes image i (every attribute it names matches)."""
    pos = torch.ones(len(keys), len(captions), dtype=torch.bool)
    for j, cap in enumerate(captions):
        for name, value in cap.attrs:
            pos[:, j] &= keys[:, ATTRS.index(name)] == value
    return pos


class BatchSampler:
    """Groups of `group_size` images sharing (domain, colour), each a different class."""

    def __init__(self, pool: Pool, cfg: PretrainConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.by_combo: dict[tuple[int, int, int], list[int]] = {}
        for i, (d, c, k, _) in enumerate(pool.attrs.tolist()):
            self.by_combo.setdefault((d, k, c), []).append(i)
        self.classes_by_dk: dict[tuple[int, int], list[int]] = {}
        for d, k, c in self.by_combo:
            self.classes_by_dk.setdefault((d, k), []).append(c)
        self.n = len(pool.attrs)

    def __call__(self) -> list[int]:
        idx: list[int] = []
        while len(idx) < self.cfg.batch_size:
            if self.rng.random() < self.cfg.mixed_groups:
                idx += [self.rng.randrange(self.n) for _ in range(self.cfg.group_size)]
                continue
            d, k = self.rng.choice(sorted(self.classes_by_dk))
            classes = self.rng.sample(self.classes_by_dk[(d, k)], min(self.cfg.group_size, len(self.classes_by_dk[(d, k)])))
            idx += [self.rng.choice(self.by_combo[(d, k, c)]) for c in classes]
        return idx[: self.cfg.batch_size]


# ----------------------------------------------------------------------------- loss

def multi_positive_clip_loss(img: Tensor, txt: Tensor, pos: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE with a uniform target over all true positives (UniCL).

    img (N, E), txt (T, E) L2-normalised; pos (N, T) bool. Texts without a positive image in the
    batch (possible for class prompts) only act as negatives.
    """
    logits = logit_scale.exp() * img @ txt.t()                      # (N, T)
    p = pos.float()
    i2t = -(F.log_softmax(logits, 1) * p / p.sum(1, keepdim=True)).sum(1).mean()
    has = p.sum(0) > 0
    t2i_logits = logits.t()[has]                                    # (T', N)
    pt = p.t()[has]
    t2i = -(F.log_softmax(t2i_logits, 1) * pt / pt.sum(1, keepdim=True)).sum(1).mean()
    return 0.5 * (i2t + t2i)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def text_features(model: nn.Module, tokenizer, texts: Sequence[str], bs: int = 256) -> Tensor:
    out = [model.encode_text(tokenizer(list(texts[i:i + bs])), normalize=True) for i in range(0, len(texts), bs)]
    return torch.cat(out)


@torch.no_grad()
def image_features(model: nn.Module, images: Tensor, bs: int = 256) -> Tensor:
    """images: uint8 (N, 3, S, S) already at model resolution."""
    return torch.cat([model.encode_image(normalize(images[i:i + bs]), normalize=True) for i in range(0, len(images), bs)])


def zero_shot_by_group(model: nn.Module, tokenizer, pool: Pool, template: str = ZS_TEMPLATE) -> dict:
    """Top-1 over all classes, per domain, split into seen and held-out (domain, class) combos."""
    was_training = model.training
    model.eval()
    cls_txt = text_features(model, tokenizer, [template.format(c.replace("_", " ")) for c in synth.CLASSES])
    pred = (image_features(model, pool.images) @ cls_txt.t()).argmax(1)
    model.train(was_training)
    return accuracy_table(pred, pool.attrs)


def accuracy_table(pred: Tensor, attrs: Tensor) -> dict:
    held = holdout_combos()
    correct = (pred == attrs[:, 1]).float()
    is_held = torch.tensor([(synth.DOMAINS[d], synth.CLASSES[c]) in held for d, c in attrs[:, :2].tolist()])
    out: dict = {"all": round(correct.mean().item(), 4)}
    seen_all = correct[~is_held]
    out["seen"] = round(seen_all.mean().item(), 4)
    out["held_out"] = round(correct[is_held].mean().item(), 4) if is_held.any() else None
    for di, d in enumerate(synth.DOMAINS):
        m = attrs[:, 0] == di
        row = {"all": round(correct[m].mean().item(), 4), "n": int(m.sum())}
        if (m & is_held).any():
            row["seen"] = round(correct[m & ~is_held].mean().item(), 4)
            row["held_out"] = round(correct[m & is_held].mean().item(), 4)
        out[d] = row
    return out


# ----------------------------------------------------------------------------- training

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, embeddings, the class token and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "token" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def progress(step: int, elapsed_s: float, cfg: PretrainConfig) -> float:
    """Fraction of the run done: by steps, or by wall clock when a `minutes` budget ends it sooner.

    With a time budget the cosine still anneals to zero when the budget ends, at the cost of the
    exact step count depending on the machine (it is logged; rerun with `--steps N --minutes 0`).
    """
    frac = step / max(1, cfg.steps)
    if cfg.minutes > 0:
        frac = max(frac, elapsed_s / (60 * cfg.minutes))
    return min(1.0, frac)


def lr_at(step: int, cfg: PretrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up times a cosine over `progress`."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress(step, elapsed_s, cfg)))


def save_weights(model: nn.Module, path: Path, meta: dict, half: bool = False) -> None:
    from safetensors.torch import save_file

    sd = {k: (v.half() if half and v.is_floating_point() else v).contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    apply_umask(tmp)  # safetensors creates 0600
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def build_model(seed: int) -> tuple[nn.Module, object]:
    import open_clip

    register_tiny_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    return model, open_clip.get_tokenizer(ARCH)


def load_pool(jobs: list, cache: Path | None, desc: str) -> Pool:
    """Render a pool, or reuse one cached under `cache` for exactly these jobs."""
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=True)
        if blob.get("jobs_hash") == _jobs_hash(jobs):
            return Pool(blob["images"], blob["attrs"])
    pool = render_pool(jobs, desc=desc)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": pool.images, "attrs": pool.attrs, "jobs_hash": _jobs_hash(jobs)}, cache)
    return pool


def _jobs_hash(jobs: list) -> str:
    import hashlib

    return hashlib.sha256((synth.GENERATOR_VERSION + repr(jobs)).encode()).hexdigest()


def pretrain(cfg: PretrainConfig, out: Path, pool_cache: Path | None = None) -> dict:
    """Train, evaluating and checkpointing every `eval_every` steps; returns the final summary."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tokenizer = build_model(cfg.seed)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    t0 = time.time()
    train_pool = load_pool(train_jobs(cfg, size), pool_cache and pool_cache / f"train-s{cfg.seed}-k{cfg.per_combo}.pt", "train pool")
    eval_pool = load_pool(eval_jobs(cfg.eval_per_combo, cfg.seed, cfg.world_image_size, size),
                          pool_cache and pool_cache / f"eval-s{cfg.seed}-k{cfg.eval_per_combo}.pt", "eval pool")
    pool_s = time.time() - t0
    log = open(out / "log.jsonl", "a")
    _write_json(out / "config.json", {"config": asdict(cfg), "arch": ARCH, "holdout": sorted(map(list, holdout_combos())),
                                      "pool_images": len(train_pool.attrs), "pool_seconds": round(pool_s, 1)})
    sampler = BatchSampler(train_pool, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    crng = random.Random(cfg.seed + 1)
    # A free linear classifier gives the vision tower a direct class signal from step one; through
    # the text tower alone the 32 class prompts start almost collinear and shape is learnt slowly.
    aux = nn.Linear(model.text_projection.shape[1], len(synth.CLASSES), bias=False)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay) + [{"params": aux.parameters(), "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    prompts = class_prompts()
    token_cache: dict[str, Tensor] = {}
    model.train()
    t_start, ema, step = time.time(), None, 0
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, desc="pretrain", unit="step", mininterval=10)
    for step in range(cfg.steps):
        lr = lr_at(step, cfg, time.time() - t_start)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = sampler()
        keys = train_pool.attrs[idx]
        images = normalize(augment(train_pool.images[idx], gen))
        chosen = crng.sample(keys.tolist(), min(cfg.captions_per_batch, len(keys)))
        caps = _dedupe([sample_caption(k, crng) for k in chosen] + prompts)
        tokens = _tokens(tokenizer, [c.text for c in caps], token_cache)
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        pos = positives(keys, caps)
        assert bool(pos.any(1).all()), "every image must have a positive caption"  # its class prompt at least
        loss = multi_positive_clip_loss(img, txt, pos, model.logit_scale)
        if cfg.aux_class_weight > 0:
            aux_logits = 16.0 * img @ F.normalize(aux.weight, dim=-1).t()   # (N, C) cosine classifier
            loss = loss + cfg.aux_class_weight * F.cross_entropy(aux_logits, keys[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        done = step + 1 == cfg.steps
        over_time = cfg.minutes > 0 and progress(step + 1, time.time() - t_start, cfg) >= 1.0 and not done
        if (step + 1) % cfg.eval_every == 0 or done or over_time:
            acc = zero_shot_by_group(model, tokenizer, eval_pool)
            rec = {"step": step + 1, "loss_ema": round(ema, 4), "lr": lr, "logit_scale": round(model.logit_scale.exp().item(), 2),
                   "elapsed_s": round(time.time() - t_start, 1), "zero_shot": acc}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tqdm.write(f"step {step + 1}: loss {ema:.3f} zs all {acc['all']:.3f} seen {acc['seen']:.3f} held {acc['held_out']:.3f} "
                       + " ".join(f"{d} {acc[d]['all']:.2f}" for d in synth.DOMAINS) + f" ({rec['elapsed_s']:.0f}s)")
            save_weights(model, out / "last.safetensors", {"step": step + 1, "config": asdict(cfg), "zero_shot": acc})
        if over_time:
            tqdm.write(f"stopping at step {step + 1}: --minutes {cfg.minutes} reached")
            break
    bar.close()
    summary = {"steps_done": step + 1, "wall_s": round(time.time() - t_start, 1), "pool_s": round(pool_s, 1), "final_zero_shot": acc}
    _write_json(out / "summary.json", summary)
    return summary


def _dedupe(caps: Iterable[Caption]) -> list[Caption]:
    seen: dict[str, Caption] = {}
    for c in caps:
        seen.setdefault(c.text, c)
    return list(seen.values())


def _tokens(tokenizer, texts: list[str], cache: dict[str, Tensor]) -> Tensor:
    missing = [t for t in texts if t not in cache]
    if missing:
        for t, row in zip(missing, tokenizer(missing)):
            cache[t] = row
    return torch.stack([cache[t] for t in texts])


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- load and finalize

def load_tiny(weights: str | os.PathLike) -> tuple[nn.Module, object, object]:
    """The packaged architecture with `weights`, through open_clip's own loader (never the network)."""
    import open_clip

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_tiny_config()
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(weights))
    model.eval()
    return model, open_clip.get_tokenizer(ARCH), preprocess


def finalize(ckpt: Path, weights_dir: Path = WEIGHTS_DIR, half: bool = True) -> dict:
    """Ship a training checkpoint: fp16 safetensors + sha256 next to it."""
    from safetensors import safe_open

    model, _ = build_model(0)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(ckpt)))
    with safe_open(str(ckpt), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    weights_dir.mkdir(parents=True, exist_ok=True)
    out = weights_dir / f"{ARCH}.safetensors"
    save_weights(model, out, {"arch": ARCH, "dtype": "float16" if half else "float32", "step": meta.get("step"),
                              "config": meta.get("config"), "zero_shot_eval_pool": meta.get("zero_shot")}, half=half)
    from .files import file_sha256

    sha = file_sha256(out)
    (weights_dir / f"{ARCH}.sha256").write_text(f"{sha}  {out.name}\n")
    return {"path": str(out), "sha256": sha, "bytes": out.stat().st_size, "step": meta.get("step")}


def finalize_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clipheads.training.pretrain finalize")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--fp32", action="store_true")
    a = p.parse_args(argv)
    info = finalize(a.ckpt, a.weights_dir, half=not a.fp32)
    print(f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB, step {info['step']}), sha256 {info['sha256']}")
    return 0


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if argv and argv[0] == "report":
        from .tiny_report import report_main  # the report's imports stay out of pretraining

        return report_main(argv[1:])
    if argv and argv[0] == "finalize":
        return finalize_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m clipheads.training.pretrain", description="pretrain clipheads-tiny on the synthetic world")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--pool-cache", type=Path, default=None, help="directory to cache rendered image pools")
    for f in PretrainConfig.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    out, cache = args.pop("out"), args.pop("pool_cache")
    cfg = PretrainConfig(**args)
    summary = pretrain(cfg, out, cache)
    zs = summary["final_zero_shot"]
    print(f"done: {summary['steps_done']} steps in {summary['wall_s'] / 60:.1f} min; zero-shot seen {zs['seen']:.3f}, "
          f"held-out {zs['held_out']:.3f}; weights {out / 'last.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
