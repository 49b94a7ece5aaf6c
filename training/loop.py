"""The one training loop every method shares, and evaluation.

Dassl semantics (METHODS.md 0.3): SGD (momentum 0.9, wd 5e-4) or AdamW; cosine annealing stepped
once per epoch with an optional constant warm-up; the model after the last epoch is the result.
Gradients reach only the head's parameters; the backbone is frozen and stays in eval mode.
Multi-task runs interleave batches of each task (each task its own class list) and record
per-task losses and accuracies.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.loading import make_loader
from .data.records import Sample
from .methods.base import HeadMethod


PRECISIONS = ("amp", "fp32", "fp16")
OPTIMIZERS = ("sgd", "adamw")


class TrainConfigError(ValueError):
    """A training setting out of its range or of the wrong type (bad input: exit 2)."""


def _opt(default, help: str):
    """A TrainConfig field with its --help text (the CLI builds one flag per field)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings, one frozen value per field (each field's help is its --flag's help).
    `clipheads.train(..., epochs=10, lr=0.01)` overrides fields by keyword."""

    epochs: int = _opt(5, "training epochs")
    batch_size: int = _opt(4, "images per step")
    lr: float = _opt(0.002, "peak learning rate (cosine schedule after the warm-up)")
    optimizer: str = _opt("sgd", "sgd | adamw")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "weight decay")
    # constant warm-up (Dassl WARMUP_TYPE=constant)
    warmup_epochs: int = _opt(1, "epochs at --warmup-lr before the cosine schedule starts")
    warmup_lr: float = _opt(1e-5, "learning rate during the warm-up epochs")
    seed: int = _opt(1, "seed for sampling, augmentation and initialisation")
    # amp: fp32 master weights + fp16 autocast + GradScaler on CUDA, plain fp32 on the CPU (our
    # default, METHODS.md decisions); fp32; fp16: the official configs' `PREC: fp16` - backbone
    # and head cast to half and SGD updating the fp16 tensors directly (Dassl), restored to fp32
    # afterwards, so evaluation and the artifact see fp32 (the trained values are fp16-rounded).
    precision: str = _opt("amp", "amp (fp16 autocast on CUDA, fp32 on the CPU) | fp32 | fp16 (the official "
                                 "configs' PREC fp16: half backbone and head)")
    device: str = _opt("cpu", "cpu | cuda | cuda:N")
    workers: int = _opt(0, "data-loader worker processes")
    max_steps_per_epoch: Optional[int] = _opt(None, "cap steps per epoch (smoke tests and demos)")
    # RandomResizedCrop area range. Dassl's (0.08, 1) suits photos of whole scenes; on small
    # rendered objects (the synthetic world) such crops cut the object out, so its recipes narrow it.
    crop_scale: tuple[float, float] = _opt((0.08, 1.0), "RandomResizedCrop area range MIN MAX")
    progress: bool = _opt(True, "show a progress bar (on a terminal)")

    def __post_init__(self) -> None:
        """Every setting checked once, where it is made (CLI flags, recipe files, keywords): a bad
        one fails before the backbone loads, never as a traceback from inside the loop."""
        if isinstance(self.crop_scale, list):
            object.__setattr__(self, "crop_scale", tuple(self.crop_scale))  # from a JSON recipe
        problems = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                problems.append(f"{name} must be {rule} (got {getattr(self, name)!r})")

        def number(v, integer: bool = False) -> bool:
            kinds = (int,) if integer else (int, float)
            return isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("epochs", "batch_size"):
            need(number(getattr(self, name), True) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_epochs", "workers", "seed"):
            need(number(getattr(self, name), True) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(number(self.lr) and self.lr > 0, "lr", "a number > 0")
        for name in ("weight_decay", "warmup_lr"):
            need(number(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0")
        need(number(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(self.max_steps_per_epoch is None or (number(self.max_steps_per_epoch, True) and self.max_steps_per_epoch >= 1),
             "max_steps_per_epoch", "an integer >= 1 (or unset)")
        cs = self.crop_scale
        need(isinstance(cs, tuple) and len(cs) == 2 and all(number(v) for v in cs) and 0 < cs[0] <= cs[1] <= 1,
             "crop_scale", "MIN MAX with 0 < MIN <= MAX <= 1")
        need(isinstance(self.device, str), "device", "a string")
        if problems:
            raise TrainConfigError("bad training settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """LR for 0-based `epoch`: constant warm-up, then cosine over `epochs`, stepped per epoch.
    5 epochs with 1 warm-up: 1e-5, lr, 0.905 lr, 0.655 lr, 0.345 lr."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    t = epoch - cfg.warmup_epochs
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t / cfg.epochs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(head: HeadMethod, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = head.configure_optimizer_groups()
    if not any(p.numel() for g in groups for p in g["params"]):
        raise ValueError(f"method {head.name!r} has no trainable parameters; nothing to train")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")


@dataclass
class TrainResult:
    head: HeadMethod
    history: list[dict] = field(default_factory=list)  # one row per epoch
    wall_time_s: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.history[0]["loss"] if self.history else float("nan")

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")

    def summary(self) -> dict:
        return {"epochs": len(self.history), "history": self.history, "wall_time_s": round(self.wall_time_s, 2)}


def _interleave(loaders: Sequence, rng: random.Random, cap: Optional[int]):
    """Yield (task, batch) mixing tasks in a seeded random order, each loader exhausted once."""
    iters = [iter(dl) for dl in loaders]
    order = [t for t, dl in enumerate(loaders) for _ in range(len(dl))]
    rng.shuffle(order)
    for step, t in enumerate(order):
        if cap is not None and step >= cap:
            return
        yield t, next(iters[t])


def train_head(head: HeadMethod, train_sets: Mapping[int, Sequence[Sample]], cfg: TrainConfig) -> TrainResult:
    """Train `head` on {task index: samples}. Returns the final-epoch head and its history."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    head.to(device)
    head.backbone.to(device)
    if cfg.precision == "fp16":
        with _half_precision(head):
            return _train(head, train_sets, cfg, device)
    return _train(head, train_sets, cfg, device)


class _half_precision:
    """Cast backbone and head to fp16 for training; afterwards the head returns to fp32 and the
    backbone (shared by later runs) gets its exact fp32 weights back."""

    def __init__(self, head: HeadMethod):
        self.head = head

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.head.backbone.state_dict().items()}
        self.head.backbone.half()
        self.head.half()

    def __exit__(self, *exc):
        self.head.float()
        self.head.backbone.float()
        self.head.backbone.load_state_dict(self.saved)
        return False


def _train(head: HeadMethod, train_sets: Mapping[int, Sequence[Sample]], cfg: TrainConfig, device: torch.device) -> TrainResult:
    from .console import progress

    spec = head.backbone.preprocess
    tasks = sorted(train_sets)
    loaders = [make_loader(train_sets[t], spec, True, cfg.batch_size, seed=cfg.seed + t, workers=cfg.workers,
                           crop_scale=tuple(cfg.crop_scale)) for t in tasks]
    opt = _optimizer(head, cfg)
    use_amp = cfg.precision == "amp" and device.type == "cuda"
    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rng = random.Random(cfg.seed)
    result = TrainResult(head)
    start = time.perf_counter()
    steps_per_epoch = sum(len(dl) for dl in loaders)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    bar = progress(total=cfg.epochs * steps_per_epoch, desc=f"train {head.name}", unit="step", enabled=cfg.progress)
    head.train()
    for epoch in range(cfg.epochs):
        lr = epoch_lr(cfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        sums = {t: [0.0, 0, 0] for t in tasks}  # loss sum, correct, seen
        for ti, (images, labels) in _interleave(loaders, rng, cfg.max_steps_per_epoch):
            task = tasks[ti]
            images, labels = images.to(device, dtype), labels.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss, logits = head.training_loss(images, labels, task)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            s = sums[task]
            loss_value = float(loss.detach())
            s[0] += loss_value * len(labels)
            s[1] += int((logits.argmax(-1) == labels).sum())
            s[2] += len(labels)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        seen = sum(s[2] for s in sums.values()) or 1
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": sum(s[0] for s in sums.values()) / seen,
            "train_acc": sum(s[1] for s in sums.values()) / seen,
        }
        if len(tasks) > 1:
            row["per_task"] = {head.tasks[t].name: {"loss": s[0] / max(s[2], 1), "acc": s[1] / max(s[2], 1)} for t, s in sums.items()}
        result.history.append(row)
    bar.close()
    head.eval()
    result.wall_time_s = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate(
    head: HeadMethod,
    samples: Sequence[Sample],
    task: int = 0,
    classnames: Optional[Sequence[str]] = None,
    batch_size: int = 100,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Top-1 accuracy of `head` on `samples` (labels index `classnames`, default the task's).

    Foldable heads compute the class matrix once; others (CoCoOp) score per batch."""
    from .console import progress as progress_bar

    head.eval()
    names = tuple(classnames) if classnames is not None else head.tasks[task].classnames
    loader = make_loader(samples, head.backbone.preprocess, False, batch_size)
    w: Optional[Tensor] = head.text_features(names, task) if head.foldable else None
    correct = total = 0
    for images, labels in progress_bar(loader, desc="eval", unit="batch", enabled=progress):
        images, labels = images.to(device), labels.to(device)
        if w is not None:
            logits = head.image_features(images, task) @ w.t()
        else:
            logits = head.logits(images, task, names)
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return {"top1": correct / max(total, 1), "n": total, "classes": len(names)}
