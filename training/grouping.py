"""Gradient-driven task grouping (MmAP, METHODS.md 7.5; the procedure is our design).

1. Warm up ONE prompt shared by all tasks, training it on every task, and accumulate each task's
   gradient of the shared parameter (`collect_task_gradients`).
2. Cosine similarity between the tasks' accumulated gradients (`task_gradient_similarity`).
3. Partition the tasks (`best_partition`):
   * up to `EXHAUSTIVE_MAX_TASKS` (6, Bell(6) = 203 partitions) every set partition is scored;
     beyond, agglomerative clustering with average linkage on the similarity gives one candidate
     partition per number of groups.
   * `n_groups` given: the partition with exactly that many groups maximising the mean
     intra-group similarity (mean over same-group task pairs); ties go to the larger separation.
   * `n_groups=None`: maximise the **separation** = mean intra-group pair similarity minus mean
     inter-group pair similarity (singleton groups allowed). A term with no pairs (all singletons:
     no intra pair; one group: no inter pair) counts as the mean over all pairs, so both trivial
     partitions score 0 and a partition wins only by separating similar from dissimilar tasks.
     Ties go to fewer groups. If no partition scores above 0, the tasks are all alike: one group
     when their mean similarity is positive, otherwise every task alone.
4. `assign_groups` writes the partition into the tasks' `TaskSpec.group` for the MmAP head.

`group_tasks` runs 1-3 for MmAP in one call and returns a `GroupingReport`.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

EXHAUSTIVE_MAX_TASKS = 6


# ---- similarity ------------------------------------------------------------------------------
def task_gradient_similarity(per_task_grads: Mapping[str, Tensor]) -> tuple[list[str], Tensor]:
    """{task name: gradient (any shape)} -> (names, (T, T) cosine-similarity matrix, diagonal 1).
    A zero gradient has similarity 0 to every other task."""
    if not per_task_grads:
        raise ValueError("no task gradients given")
    names = list(per_task_grads)
    flat = torch.stack([per_task_grads[n].detach().reshape(-1).double().cpu() for n in names])  # (T, P)
    if flat.shape[1] == 0:
        raise ValueError("task gradients are empty tensors")
    unit = F.normalize(flat, dim=1)
    sim = unit @ unit.t()  # (T, T)
    sim.fill_diagonal_(1.0)
    return names, sim.float()


# ---- partitions ------------------------------------------------------------------------------
def set_partitions(n: int) -> Iterator[list[list[int]]]:
    """Every partition of 0..n-1 (restricted growth strings), groups ordered by first member."""
    if n == 0:
        yield []
        return
    labels = [0] * n

    def rec(i: int, k: int) -> Iterator[list[list[int]]]:
        if i == n:
            groups: list[list[int]] = [[] for _ in range(k)]
            for item, g in enumerate(labels):
                groups[g].append(item)
            yield groups
            return
        for g in range(k + 1):
            labels[i] = g
            yield from rec(i + 1, max(k, g + 1))

    labels[0] = 0
    yield from rec(1, 1)


@dataclass(frozen=True)
class PartitionScore:
    intra: float  # mean similarity over same-group pairs (the all-pairs mean when there are none)
    inter: float  # mean similarity over different-group pairs (the all-pairs mean when none)

    @property
    def separation(self) -> float:
        return self.intra - self.inter


def partition_score(sim: Tensor, groups: Sequence[Sequence[int]]) -> PartitionScore:
    t = sim.shape[0]
    label = torch.empty(t, dtype=torch.long)
    for g, members in enumerate(groups):
        label[list(members)] = g
    iu = torch.triu_indices(t, t, offset=1)
    if iu.shape[1] == 0:  # a single task
        return PartitionScore(1.0, 1.0)
    vals = sim.double()[iu[0], iu[1]]
    same = label[iu[0]] == label[iu[1]]
    everything = float(vals.mean())
    intra = float(vals[same].mean()) if bool(same.any()) else everything
    inter = float(vals[~same].mean()) if bool((~same).any()) else everything
    return PartitionScore(intra, inter)


def _canonical(groups: Iterable[Iterable[int]]) -> list[list[int]]:
    return sorted((sorted(g) for g in groups if g), key=lambda g: g[0])


def _agglomerative_levels(sim: Tensor) -> dict[int, list[list[int]]]:
    """Average-linkage merges from T singletons to one group: {number of groups: partition}."""
    s = sim.double()
    clusters = [[i] for i in range(s.shape[0])]
    levels = {len(clusters): _canonical(clusters)}
    while len(clusters) > 1:
        best, pair = None, None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            link = float(s[clusters[a]][:, clusters[b]].mean())
            if best is None or link > best:
                best, pair = link, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
        levels[len(clusters)] = _canonical(clusters)
    return levels


def _check_sim(sim: Tensor) -> Tensor:
    sim = torch.as_tensor(sim)
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square matrix, got shape {tuple(sim.shape)}")
    return sim


def choose_partition(sim: Tensor, n_groups: Optional[int] = None) -> tuple[list[list[int]], PartitionScore, str]:
    """(groups, score, search) under the rules of the module docstring."""
    sim = _check_sim(sim)
    t = sim.shape[0]
    if n_groups is not None and not 1 <= n_groups <= t:
        raise ValueError(f"n_groups must be in 1..{t}, got {n_groups}")
    if t <= EXHAUSTIVE_MAX_TASKS:
        search = "exhaustive"
        candidates = [_canonical(p) for p in set_partitions(t)]
    else:
        search = "agglomerative (average linkage)"
        candidates = list(_agglomerative_levels(sim).values())
    if n_groups is not None:
        candidates = [p for p in candidates if len(p) == n_groups]
    scored = [(p, partition_score(sim, p)) for p in candidates]
    if n_groups is not None:
        groups, score = max(scored, key=lambda ps: (ps[1].intra, ps[1].separation))
        return groups, score, search
    # ties to fewer groups: max() keeps the first maximum, so order by group count first
    scored.sort(key=lambda ps: len(ps[0]))
    groups, score = max(scored, key=lambda ps: round(ps[1].separation, 12))
    if score.separation <= 1e-9:
        mean_all = partition_score(sim, [list(range(t))]).intra
        groups = [list(range(t))] if mean_all > 0 else [[i] for i in range(t)]
        score = partition_score(sim, groups)
    return groups, score, search


def best_partition(sim: Tensor, n_groups: Optional[int] = None) -> list[list[int]]:
    """Task groups (lists of task indices, each sorted, ordered by first member)."""
    return choose_partition(sim, n_groups)[0]


def warmup_steps(requested: Optional[int], batches_per_task: Sequence[int]) -> int:
    """Warm-up length: `requested`, or by default two passes over the smallest task's batches,
    kept within 5..50 steps (a short look at the gradients, not a training run)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"grouping warm-up steps must be >= 1, got {requested}")
        return int(requested)
    return max(5, min(50, 2 * min(batches_per_task)))


# ---- report ------------------------------------------------------------------------------
@dataclass
class GroupingReport:
    names: list[str]
    similarity: Tensor  # (T, T) cosine similarity of the tasks' accumulated gradients
    groups: list[list[int]]  # task indices per group; group g = groups[g]
    score: PartitionScore
    search: str  # "exhaustive" | "agglomerative (average linkage)"
    n_groups_requested: Optional[int] = None
    steps: Optional[int] = None  # warm-up steps behind the gradients, when known

    @property
    def group_of(self) -> dict[str, int]:
        return {self.names[i]: g for g, members in enumerate(self.groups) for i in members}

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "similarity": [[round(float(v), 6) for v in row] for row in self.similarity],
            "groups": [[self.names[i] for i in g] for g in self.groups],
            "intra": self.score.intra,
            "inter": self.score.inter,
            "separation": self.score.separation,
            "search": self.search,
            "n_groups_requested": self.n_groups_requested,
            "steps": self.steps,
        }

    def to_markdown(self) -> str:
        head = "| task | " + " | ".join(self.names) + " |"
        rule = "|---|" + "---:|" * len(self.names)
        rows = [f"| {n} | " + " | ".join(f"{float(v):+.3f}" for v in self.similarity[i]) + " |" for i, n in enumerate(self.names)]
        how = f"{self.n_groups_requested} groups requested" if self.n_groups_requested else "number of groups chosen by separation"
        lines = [
            "### Task grouping",
            "",
            "Cosine similarity of per-task gradients of the shared prompt"
            + (f" ({self.steps} warm-up steps)" if self.steps else "") + ":",
            "",
            head,
            rule,
            *rows,
            "",
            f"Groups ({self.search} search, {how}):",
            "",
            *[f"- group {g}: " + ", ".join(self.names[i] for i in members) for g, members in enumerate(self.groups)],
            "",
            f"Mean intra-group similarity {self.score.intra:+.3f}, inter-group {self.score.inter:+.3f}, "
            f"separation {self.score.separation:+.3f}.",
        ]
        return "\n".join(lines) + "\n"


def grouping_report(per_task_grads: Mapping[str, Tensor], n_groups: Optional[int] = None,
                    steps: Optional[int] = None) -> GroupingReport:
    names, sim = task_gradient_similarity(per_task_grads)
    groups, score, search = choose_partition(sim, n_groups)
    return GroupingReport(names, sim, groups, score, search, n_groups, steps)


def assign_groups(tasks: Sequence, groups: Sequence[Sequence[int]]) -> tuple:
    """The tasks (TaskSpec) with `group` set from a partition of their indices."""
    label = {i: g for g, members in enumerate(groups) for i in members}
    if sorted(label) != list(range(len(tasks))):
        raise ValueError(f"groups {list(groups)} are not a partition of the {len(tasks)} task indices")
    return tuple(dataclasses.replace(t, group=label[i]) for i, t in enumerate(tasks))


# ---- gradients ---------------------------------------------------------------------------
Batches = Iterable[tuple[Tensor, Tensor]]


def _forever(batches: Batches) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("a task has no batches")


def collect_task_gradients(
    method,
    batches_per_task: Union[Mapping[Union[int, str], Batches], Sequence[Batches]],
    steps: int,
    param: Optional[str] = None,
    lr: float = 0.002,
    momentum: float = 0.9,
    update: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, Tensor]:
    """Warm up `method` on all tasks and accumulate each task's gradient of one shared parameter.

    `method`: a HeadMethod whose parameter `param` (a name in `named_parameters()`) is shared by
    every task (default: the method's `grouping_parameter`, e.g. MmAP's single group prompt built
    with all tasks in group 0 and `task_specific=False`). `batches_per_task`: (images, labels)
    batches per task, keyed by task index or name (or a sequence in task order); each is cycled.
    Each step draws one batch per task, takes every task's gradient, adds the gradient of
    `param` to that task's running sum, and (if `update`) makes one SGD step on the mean loss
    over tasks. Batches are moved to `device` (default: where `param` lives). Returns
    {task name: summed gradient}, shaped like `param`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    param = param or getattr(method, "grouping_parameter", None)
    if param is None:
        raise ValueError(f"name the shared parameter of {type(method).__name__} (`param=`)")
    named = dict(method.named_parameters())
    if param not in named:
        raise ValueError(f"{type(method).__name__} has no parameter {param!r}; it has {sorted(named)}")
    target = named[param]
    if not target.requires_grad:
        raise ValueError(f"parameter {param!r} does not require grad")
    trainable = [p for p in method.parameters() if p.requires_grad]
    device = target.device if device is None else torch.device(device)
    index = {t.name: i for i, t in enumerate(method.tasks)}
    if isinstance(batches_per_task, Mapping):
        streams = {index[k] if isinstance(k, str) else int(k): _forever(v) for k, v in batches_per_task.items()}
    else:
        streams = {i: _forever(v) for i, v in enumerate(batches_per_task)}
    if not streams or any(not 0 <= t < len(method.tasks) for t in streams):
        raise ValueError(f"batches_per_task must name tasks of the head: {sorted(index)}")
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum) if update else None
    sums = {t: torch.zeros_like(target, dtype=torch.float32) for t in streams}
    was_training = method.training
    method.train()
    try:
        for _ in range(steps):
            step_grads = [torch.zeros_like(p) for p in trainable]
            for t, stream in streams.items():
                images, labels = next(stream)
                images, labels = images.to(device), labels.to(device)
                loss, _ = method.training_loss(images, labels, t)
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
                for acc, g, p in zip(step_grads, grads, trainable):
                    if g is not None:
                        acc.add_(g)
                        if p is target:
                            sums[t].add_(g.float())
            if opt is not None:
                for p, g in zip(trainable, step_grads):
                    p.grad = g / len(streams)
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        method.train(was_training)
    return {method.tasks[t].name: g for t, g in sorted(sums.items())}


def group_tasks(
    backbone,
    tasks: Sequence,
    batches_per_task: Union[Mapping[Union[int, str], Batches], Sequence[Batches]],
    steps: int,
    n_groups: Optional[int] = None,
    method: str = "mmap",
    config: Optional[Mapping[str, Any]] = None,
    param: Optional[str] = None,
    lr: float = 0.002,
    seed: int = 0,
) -> GroupingReport:
    """Steps 1-3 in one call: a warm-up head with one prompt shared by every task (for MmAP:
    all tasks in group 0, no task-specific prompts), its per-task gradients, the partition."""
    from .methods import build_method

    cfg = dict(config or {})
    warm_tasks = [dataclasses.replace(t, group=0) for t in tasks]
    if method == "mmap":
        cfg.update(group_shared=True, task_specific=False, n_groups=1)
    torch.manual_seed(seed)
    head = build_method(method, backbone, warm_tasks, cfg)
    head.to(next(backbone.model.parameters()).device)  # heads are built on the CPU
    grads = collect_task_gradients(head, batches_per_task, steps, param=param, lr=lr)
    return grouping_report(grads, n_groups, steps)
