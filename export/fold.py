"""Folding: trained heads -> plain torch modules holding only constants (the graphs to export).

Like open_clip's `build_zero_shot_classifier`, folding is a pure function of the heads:

* class matrix per task: `W_t = head.text_features(task classnames, t)` under no_grad, (C_t, E)
* image path per task: `head.image_hooks(t)` under no_grad. Three kinds:
    - no hooks (zero-shot, CoOp, any text-only method): the plain CLIP image tower, one path
      shared by every such task of every head;
    - `PromptHooks` (VPT, IVLP, MaPLe, COMMA, MmAP): constant prompt tensors. Tasks whose prompts
      have the same layout (P, D and the set of deep blocks) are stacked into one bank
      (T, P, D) gathered by a `task_index` input, so a mixed-task batch is one call; tasks with
      identical prompts share a bank row;
    - any other hooks (adapters, `SideBranchHooks`: MMA): the head's modules are kept in the
      graph; tasks of one head that give identical features on a probe share one graph.
* logits of a graph: `exp(logit_scale) * normalize(f) @ W_graph.T` with the class matrices of all
  the graph's tasks concatenated, (N, sum C); each task owns a column slice `logit_slice`.

Every folded image module has the same signature: `forward(pixels, task_index) -> (logits,
features)`; `pixels` is uint8 (N, 3, S, S) (normalised in the graph with the head's mean/std) or
float32 already normalised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from clipheads.training.backbone import NO_HOOKS, Backbone, PreprocessSpec, TowerHooks
from clipheads.training.hooks import PromptHooks
from clipheads.training.methods.base import HeadMethod
from clipheads.training.text_length import trimmed_text

INPUT_DTYPES = ("uint8", "float32")


class FoldError(ValueError):
    """The heads cannot be folded (not foldable, different backbones or preprocessing)."""


@dataclass(frozen=True)
class FoldedTask:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    method: str
    head: int  # index of the head in the folded list
    head_task: int  # index of the task inside its head
    graph: str  # image graph file, e.g. "image_0.onnx"
    task_index: int  # row of the graph's prompt bank (0 when the graph has none)
    logit_slice: tuple[int, int]  # columns of this task in the graph's logits

    def to_json(self) -> dict:
        return {
            "name": self.name, "classnames": list(self.classnames), "templates": list(self.templates),
            "method": self.method, "graph": self.graph, "task_index": self.task_index,
            "logit_slice": list(self.logit_slice),
        }


class _Pixels(nn.Module):
    """uint8 (N,3,S,S) -> normalised float, or float32 passed through."""

    def __init__(self, preprocess: PreprocessSpec, input_dtype: str):
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise FoldError(f"input dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
        self.input_dtype = input_dtype
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        if self.input_dtype == "float32":
            return pixels.to(self.mean.dtype)
        # the buffers' dtype is the module's compute dtype (float32, or float16 after .half())
        return (pixels.to(self.mean.dtype) * (1.0 / 255.0) - self.mean) * self.inv_std


class FoldedImageEncoder(nn.Module):
    """One image graph: pixels (N,3,S,S), task_index (N,) int64 -> logits (N, sum C), features (N, E).

    `bank`: None, or a per-task stack of prompt tensors {"shallow": (T,P,D) or None,
    "deep": {block: (T,P,D)}} gathered by task_index (`hooks` must then be None).
    `hooks`: fixed hooks for every sample (adapters); their modules live in `hook_owner`.
    """

    def __init__(
        self,
        backbone: Backbone,
        class_matrix: Tensor,  # (K, E) normalised rows, all tasks of this graph concatenated
        logit_scale: float,
        preprocess: PreprocessSpec,
        input_dtype: str = "uint8",
        bank: Optional[dict] = None,
        hooks: Optional[TowerHooks] = None,
        hook_owner: Optional[nn.Module] = None,
    ):
        super().__init__()
        if bank is not None and hooks is not None:
            raise FoldError("a graph has either a prompt bank or fixed hooks, not both")
        self.backbone = backbone
        self.pixels = _Pixels(preprocess, input_dtype)
        self.register_buffer("class_matrix", class_matrix.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.hook_owner = hook_owner
        self._hooks = hooks
        self.deep_blocks: tuple[int, ...] = ()
        self.has_shallow = False
        self.bank_size = 1
        if bank is not None:
            shallow = bank.get("shallow")
            if shallow is not None:
                self.register_buffer("bank_shallow", shallow.detach().float().clone())  # (T, P, D)
                self.has_shallow = True
                self.bank_size = shallow.shape[0]
            self.deep_blocks = tuple(sorted(bank.get("deep", {})))
            for b in self.deep_blocks:
                t = bank["deep"][b].detach().float().clone()  # (T, P, D)
                self.register_buffer(f"bank_deep_{b}", t)
                self.bank_size = t.shape[0]
        self.uses_bank = bank is not None

    def hooks_for(self, task_index: Tensor) -> TowerHooks:
        if self.uses_bank:
            # ONNX Gather counts negative indices from the end: send them past it, an error like any
            # other out-of-range row (BUNDLE.md), never a silent pick of the last rows
            task_index = torch.where(task_index < 0, torch.full_like(task_index, self.bank_size), task_index)
            shallow = self.bank_shallow.index_select(0, task_index) if self.has_shallow else None  # (N, P, D)
            deep = {b: getattr(self, f"bank_deep_{b}").index_select(0, task_index) for b in self.deep_blocks}
            return PromptHooks(deep=deep, shallow=shallow)
        return self._hooks if self._hooks is not None else NO_HOOKS

    def forward(self, pixels: Tensor, task_index: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pixels(pixels)  # (N, 3, S, S) float
        f = self.backbone.encode_image(x, self.hooks_for(task_index))  # (N, E) normalised
        logits = self.logit_scale * f @ self.class_matrix.t()  # (N, K)
        if not self.uses_bank:
            # + 0: keeps task_index a real input of every image graph (one calling convention);
            # exporters drop inputs nothing reads
            logits = logits + (task_index[:1] * 0).to(logits.dtype)
        return logits, f


class TextEncoder(nn.Module):
    """tokens (N, L) int64 -> L2-normalised text features (N, E): the plain text tower.

    With `variable_length`, L may be anything up to the context: callers cut the tokens to
    `backbone.trimmed_length(tokens)` first (same features, text_length.py); the module itself
    never trims, so an exported graph holds no data-dependent length."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    @property
    def variable_length(self) -> bool:
        probe = self.backbone.tokenize(["a"]).cpu()
        return self.backbone.trimmed_length(probe) is not None

    def forward(self, tokens: Tensor) -> Tensor:
        return self.backbone.encode_text(tokens, trim=False)


@dataclass
class FoldedGraph:
    name: str  # file name of the graph, "image_0.onnx"
    kind: str  # "plain" | "prompt-bank" | "adapters"
    encoder: FoldedImageEncoder
    tasks: list[FoldedTask] = field(default_factory=list)


@dataclass
class FoldPlan:
    backbone: Backbone
    heads: list[HeadMethod]
    graphs: list[FoldedGraph]
    tasks: list[FoldedTask]
    text: TextEncoder
    preprocess: PreprocessSpec
    logit_scale: float
    input_dtype: str


# ---- pure helpers ---------------------------------------------------------------------------
def class_matrix(head: HeadMethod, task: int) -> Tensor:
    """(C, E) normalised class embeddings of one task, as constants."""
    with torch.no_grad(), trimmed_text():  # the used text length only: same features, a fraction of the time
        return head.text_features(head.tasks[task].classnames, task).detach().float().cpu()


def check_foldable(head: HeadMethod) -> None:
    if not getattr(type(head), "foldable", True):
        summary = getattr(type(head), "summary", "")
        raise FoldError(
            f"method {head.name!r} is not foldable into [image graph + constant class matrix]"
            + (f" ({summary})" if summary else "")
            + "; serve it with the PyTorch runtime (clipheads serve HEAD.head.safetensors) instead"
        )


def _prompt_layout(h: PromptHooks) -> tuple:
    """What must agree for two PromptHooks to share one bank."""
    if h.slot_start is not None:
        raise FoldError("vision prompts with slot_start are not supported")
    sh = None if h.shallow is None else tuple(h.shallow.shape)
    return (sh, tuple((b, tuple(t.shape)) for b, t in sorted(h.deep.items())))


def _same_prompts(a: PromptHooks, b: PromptHooks) -> bool:
    if (a.shallow is None) != (b.shallow is None):
        return False
    if a.shallow is not None and not torch.equal(a.shallow, b.shallow):
        return False
    return a.deep.keys() == b.deep.keys() and all(torch.equal(a.deep[k], b.deep[k]) for k in a.deep)


def _probe_pixels(backbone: Backbone, n: int = 2) -> Tensor:
    s = backbone.preprocess.image_size
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, 3, s, s, generator=g)


def fold_heads(
    heads: Sequence[HeadMethod],
    input_dtype: str = "uint8",
    preprocess: Optional[PreprocessSpec] = None,
) -> FoldPlan:
    """Fold heads sharing one backbone into image graphs + a text graph (module doc)."""
    if not heads:
        raise FoldError("nothing to fold: give at least one head")
    if input_dtype not in INPUT_DTYPES:
        raise FoldError(f"input dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    backbone = heads[0].backbone
    for h in heads:
        check_foldable(h)
        if h.backbone is not backbone:
            raise FoldError("all heads of one bundle must be built on the same Backbone object")
    names = [t.name for h in heads for t in h.tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FoldError(f"task names must be unique across the bundle's heads; repeated: {dup}")
    preprocess = preprocess or backbone.preprocess
    scale = float(backbone.logit_scale.detach().float().cpu())
    for h in heads:
        h.eval()

    # 1. classify every task's image path
    plain: list[tuple[int, int]] = []
    banks: dict[tuple, list] = {}  # layout -> [rows: PromptHooks], [(head, task, row)]
    adapters: list[tuple[int, list[list[int]]]] = []  # (head, groups of its tasks sharing features)
    with torch.no_grad():
        for hi, h in enumerate(heads):
            generic: list[int] = []
            for ti in range(len(h.tasks)):
                hooks = h.image_hooks(ti)
                if hooks is NO_HOOKS or type(hooks) is TowerHooks:
                    plain.append((hi, ti))
                elif isinstance(hooks, PromptHooks):
                    key = _prompt_layout(hooks)
                    rows, members = banks.setdefault(key, ([], []))
                    row = next((r for r, p in enumerate(rows) if _same_prompts(p, hooks)), None)
                    if row is None:
                        rows.append(hooks)
                        row = len(rows) - 1
                    members.append((hi, ti, row))
                else:
                    generic.append(ti)
            if generic:
                x = _probe_pixels(backbone)
                groups: list[tuple[Tensor, list[int]]] = []
                for ti in generic:
                    f = h.image_features(x, ti)
                    for ref, members in groups:
                        if torch.equal(ref, f):
                            members.append(ti)
                            break
                    else:
                        groups.append((f, [ti]))
                adapters.append((hi, [m for _, m in groups]))

    # 2. build one module per graph
    graphs: list[FoldedGraph] = []

    def add_graph(kind: str, members: list[tuple[int, int, int]], **enc_kw) -> None:
        name = f"image_{len(graphs)}.onnx"
        ws, tasks, start = [], [], 0
        for hi, ti, row in members:
            h = heads[hi]
            spec = h.tasks[ti]
            w = class_matrix(h, ti)  # (C, E)
            ws.append(w)
            tasks.append(FoldedTask(spec.name, tuple(spec.classnames), h.templates_for(ti), h.name, hi, ti,
                                    name, row, (start, start + w.shape[0])))
            start += w.shape[0]
        enc = FoldedImageEncoder(backbone, torch.cat(ws), scale, preprocess, input_dtype, **enc_kw).eval()
        graphs.append(FoldedGraph(name, kind, enc, tasks))

    if plain:
        add_graph("plain", [(hi, ti, 0) for hi, ti in plain])
    for rows, members in banks.values():
        bank = {
            "shallow": torch.stack([p.shallow.detach().float() for p in rows]) if rows[0].shallow is not None else None,
            "deep": {b: torch.stack([p.deep[b].detach().float() for p in rows]) for b in rows[0].deep},
        }
        add_graph("prompt-bank", members, bank=bank)
    for hi, groups in adapters:
        h = heads[hi]
        for group in groups:
            with torch.no_grad():
                hooks = h.image_hooks(group[0])
            add_graph("adapters", [(hi, ti, 0) for ti in group], hooks=hooks, hook_owner=h)

    order = {(t.head, t.head_task): t for g in graphs for t in g.tasks}
    tasks = [order[(hi, ti)] for hi, h in enumerate(heads) for ti in range(len(h.tasks))]
    return FoldPlan(backbone, list(heads), graphs, tasks, TextEncoder(backbone).eval(), preprocess, scale, input_dtype)


def eager_logits(plan: FoldPlan, task: FoldedTask, images: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: the head's own eager path on normalised float images -> (logits (N,C), features)."""
    h = plan.heads[task.head]
    with torch.no_grad():
        return h.logits(images, task.head_task).float(), h.image_features(images, task.head_task).float()
