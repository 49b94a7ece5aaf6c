"""The one interface every method implements, and the registry that lists them.

A method is a small `nn.Module` holding only its trainable tensors. The frozen backbone is
attached but *not* a submodule, so `state_dict()` is exactly the head. Training, saving,
export and tests talk to methods through these hooks only:

* `text_features(classnames, task)`  -> (C, E) normalized class embeddings (the class matrix W)
* `image_hooks(task)`                -> TowerHooks for the image tower; class-independent
                                        prompt tensors are materialised *when called*, so a call
                                        under `torch.no_grad()` yields the folded constants
* `extra_loss(...)`                  -> an optional regulariser (COMMA's distillation)
* `foldable`                         -> whether [image graph + constant W] represents the head

Multi-task: a head is built for a tuple of tasks; methods share their parameters across tasks
unless they say otherwise (MmAP), which is what the papers' "-MT" baselines are.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import NO_HOOKS, Backbone, TowerHooks


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: its label set and the hand-crafted templates for it."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...] = ("a photo of a {}.",)
    group: int = 0  # task group (MmAP); 0 when the method does not group

    def to_json(self) -> dict:
        return {"name": self.name, "classnames": list(self.classnames), "templates": list(self.templates), "group": self.group}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TaskSpec":
        return cls(d["name"], tuple(d["classnames"]), tuple(d.get("templates") or ("a photo of a {}.",)), int(d.get("group", 0)))


class MethodError(ValueError):
    """Unknown method, bad method config, or a head that does not fit its backbone."""


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (from JSON, `--set` or a head file) has its field's type; the types
    method configs use: bool, int, float, str, Optional, Union, Literal, tuple[X, ...]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union:
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        kinds = (int, float) if hint is float else (int,)
        return isinstance(value, kinds) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return True  # other annotations are the method's own to check


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config; subclasses add frozen fields with documented defaults."""

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "MethodConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MethodError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        for f in dataclasses.fields(cls):  # JSON gives lists where configs hold tuples
            if f.name in d and isinstance(d[f.name], list):
                d[f.name] = tuple(d[f.name])
        hints = typing.get_type_hints(cls)
        wrong = [f"{k}={v!r} (expected {_type_name(hints[k])})" for k, v in d.items() if not _fits(v, hints[k])]
        if wrong:
            raise MethodError(f"bad {cls.__name__} value(s): {', '.join(wrong)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class HeadMethod(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    towers: ClassVar[tuple[str, ...]] = ()  # which towers it changes: "text", "vision"
    foldable: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, backbone: Backbone, tasks: Sequence[TaskSpec]):
        super().__init__()
        if not tasks:
            raise MethodError("a head needs at least one task")
        self.config = config
        object.__setattr__(self, "backbone", backbone)  # frozen; deliberately not a submodule
        self.tasks = tuple(tasks)
        if "vision" in self.towers:
            backbone.require_vit(f"method {self.name!r}")
        if "text" in self.towers:
            backbone.require_text_tower(f"method {self.name!r}")

    # ---- what a method overrides ------------------------------------------------------------
    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        """(C, E) normalized class embeddings. Default: hand-crafted template ensemble."""
        return template_class_embeddings(self.backbone, classnames, self.templates_for(task))

    def templates_for(self, task: int = 0) -> tuple[str, ...]:
        """The hand-crafted templates this head builds task `task`'s classes from (what summaries
        and bundle manifests report). Default: the task's own."""
        return tuple(self.tasks[task].templates)

    def image_hooks(self, task: int = 0) -> TowerHooks:
        return NO_HOOKS

    def extra_loss(self, task: int, classnames: Sequence[str]) -> Optional[Tensor]:
        return None

    # ---- shared machinery -------------------------------------------------------------------
    def image_features(self, images: Tensor, task: int = 0) -> Tensor:
        return self.backbone.encode_image(images, self.image_hooks(task))

    def logits(self, images: Tensor, task: int = 0, classnames: Optional[Sequence[str]] = None) -> Tensor:
        """(N, C) = exp(logit_scale) * cos(image, class). `classnames` defaults to the task's."""
        names = classnames if classnames is not None else self.tasks[task].classnames
        w = self.text_features(names, task)  # (C, E)
        f = self.image_features(images, task)  # (N, E)
        return self.backbone.logit_scale * f @ w.t()

    def training_loss(self, images: Tensor, labels: Tensor, task: int = 0) -> tuple[Tensor, Tensor]:
        """Cross-entropy on the task's classes plus the method's own term. Returns (loss, logits)."""
        logits = self.logits(images, task)
        loss = F.cross_entropy(logits, labels)
        extra = self.extra_loss(task, self.tasks[task].classnames)
        return (loss if extra is None else loss + extra), logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def head_tensors(self) -> dict[str, Tensor]:
        """What the artifact stores: every parameter (trained) and persistent buffer, fp32."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}

    def configure_optimizer_groups(self) -> list[dict]:
        """Parameter groups for the optimizer; methods may scale LR per group."""
        return [{"params": self.trainable_parameters()}]


def template_class_embeddings(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Zero-shot class matrix: per template normalize, average over templates, renormalize."""
    from .prompting import clean_classname

    names = [clean_classname(c) for c in classnames]
    texts = [t.format(n) for n in names for t in templates]
    feats = backbone.encode_text(backbone.tokenize(texts))  # (C*T, E) normalized
    feats = feats.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


# ---- registry ------------------------------------------------------------------------------
_METHODS: dict[str, type[HeadMethod]] = {}


def register_method(cls: type[HeadMethod]) -> type[HeadMethod]:
    """Class decorator. Names are unique; registering one twice is a bug, not an override."""
    if not cls.name:
        raise MethodError(f"{cls.__name__} has no `name`")
    if cls.name in _METHODS:
        raise MethodError(f"method {cls.name!r} is already registered by {_METHODS[cls.name].__qualname__}")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names, sorted (`clipheads.list_methods()`; `clipheads methods` counts them).

    >>> "coop" in list_methods()
    True
    """
    _import_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type[HeadMethod]:
    _import_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}") from None


def build_method(
    name: str, backbone: Backbone, tasks: Sequence[TaskSpec], config: Optional[Mapping[str, Any]] = None
) -> HeadMethod:
    cls = get_method(name)
    cfg = config if isinstance(config, MethodConfig) else cls.Config.from_dict(config)
    try:
        return cls(cfg, backbone, tasks)
    except ValueError as err:
        if type(err) is not ValueError:  # already typed (MethodError, BackboneError, ...)
            raise
        raise MethodError(f"{name}: {err}") from None  # a config that does not fit these tasks or backbone


def _import_builtin_methods() -> None:
    # The package's own methods live in one explicit list (no import-for-side-effect scanning).
    from . import BUILTIN_METHOD_MODULES
    import importlib

    for mod in BUILTIN_METHOD_MODULES:
        importlib.import_module(f"{__package__}.{mod}")
