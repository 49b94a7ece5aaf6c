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


# ----------------------------------------------------------------------------- finalize and report

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
        f"    --run runs/tiny-s0 --card training/weights/MODEL_CARD.md",
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
