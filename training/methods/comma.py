"""COMMA: Co-Articulated Multi-Modal Learning (Hu et al., AAAI 2024), METHODS.md 6.

MaPLe's token layout (n = 2, J = 9; J = 3 cross-dataset/DG) and text side (`DeepTextPrompts`), with
vision prompts *generated* from the previous block's prompts of both branches:

    P_v^0 = Linear(D_t -> D_v)(P_t^0)                       (n, D_v), as MaPLe's F_0
    P_v^b = G_{b-1}(P_v^{b-1}, P_t^{b-1})   b = 1..J-1      (n, D_v)
    G(V, T):  T' = Linear(D_t -> D_v)(T)                     (n, D_v)
              A  = softmax_rows(V T'^T / sqrt(D_v))           (n, n)
              out = MLP(LN(A T')),  MLP = Linear(D_v -> D_v/4) -> ReLU -> Linear(D_v/4 -> D_v)

Vision prompts depend on text-side parameters (ctx, deep text prompts) and G only: not on class
names, not on the image, so `image_hooks()` under `torch.no_grad()` gives J constant tensors.

Loss: CE + kd_weight * L_kd, L_kd = mean over the last S blocks of
[1 - mean over classes and ALL token positions (padding included) of cos(h, h_hat)], with h the
prompted text encoder's block output (before ln_final) and h_hat the frozen CLIP text encoder (the
same backbone, no hooks) on the teacher sentence. The two sentences differ in wording and length;
positions are still compared one to one, as the released code does (METHODS.md 6.2, 11.5).
S > 1 differs from the released code on purpose: its clip/model.py runs block -S S times and never
the last block (student and teacher alike), so its text encoder itself changes; ours runs every
block once and distils the real last S. The shipped configs use S = 1, where both agree
(tests/golden: the `comma_last2` case measures the difference).
Teacher tokens are computed once per class list and cached (not saved). The student's tokens come
from the same text forward as the class matrix (no second text pass per step).
Teacher template: `teacher_template` if set, else COMMA's own table for the task's dataset when the
task name is a CoOp dataset (`templates_for(name, "comma_teacher")`; DTD differs from CoOp's), else
the task's first template.

Gradients (METHODS.md 6.5): by default (`detach_generator=False`, the paper) the generated prompts
stay in the graph: G is trained and gradients from the deep vision prompts reach ctx, the deep
text prompts and F_0 through G. `detach_generator=True` reproduces the released code, whose
`.data` writes cut the graph: G receives no gradient (stays at its random init) and the deep vision
prompts are fixed functions of the text-side prompts (P_v^0 = F_0(ctx) is still trained through
the vision tower, as in the code).

`compound_prompts_image` ((J-1, n, D_v), N(0, 0.02^2) init, requires_grad): the released code keeps
the generated deep vision prompts in this trainable tensor, overwriting it on every forward, so its
optimised value never matters, yet it is part of the official trainable count. `image_hooks` copies
the freshly generated P_v^1..P_v^{J-1} into it, so a saved head carries its folded deep vision
prompts. With `detach_generator=True` the vision tower then reads the deep prompts from this tensor,
as the released code does, so it receives their gradient exactly as there (the golden fixtures
compare it); the next forward overwrites whatever the optimiser did with it. In the paper mode it is
only the record: never read by the forward pass, no gradient (grad stays None; SGD skips it).

Parameters on ViT-B/16 (n=2, J=9):
    ctx 1,024 + F_0 393,984 + deep text 8*1,024 + compound_prompts_image 8*1,536
    + 8 generators * 691,392 (Linear 393,984 + LN 1,536 + 147,648 + 148,224) = 5,946,624
(J=3: 1,782,912), the same in both gradient modes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import NO_HOOKS, TowerHooks
from ..data.templates import canonical_dataset_name, templates_for
from ..hooks import PromptHooks
from .base import HeadMethod, MethodConfig, MethodError, register_method
from .maple import DeepTextPrompts, clip_depth
from .prompting import clean_classname


@dataclass(frozen=True)
class COMMAConfig(MethodConfig):
    n_ctx: int = 2  # n (N_CTX)
    depth: int = 9  # J (PROMPT_DEPTH; 3 for cross-dataset/DG)
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT ("of a" stays fixed, as in MaPLe)
    init_std: float = 0.02  # deep text prompts and compound_prompts_image ~ N(0, init_std^2)
    generator_reduction: int = 4  # r: G's MLP hidden width = D_v // r (768 // 4 = 192)
    kd_weight: float = 1.0  # lambda (TRAINER.COMMA.WEIGHT)
    kd_last_layers: int = 1  # S (LAST_LAYER): distil the outputs of the last S text blocks
    teacher_template: Optional[str] = None  # None: COMMA's template for the task's dataset
    detach_generator: bool = False  # True: the released code's .data writes (G untrained)


class PromptGenerator(nn.Module):
    """G(V, T): next block's vision prompt from this block's vision (n, D_v) and text (n, D_t) prompts."""

    def __init__(self, text_width: int, vision_width: int, reduction: int):
        super().__init__()
        self.fc = nn.Linear(text_width, vision_width)
        self.ln = nn.LayerNorm(vision_width)
        self.mlp = nn.Sequential(
            nn.Linear(vision_width, vision_width // reduction),
            nn.ReLU(),
            nn.Linear(vision_width // reduction, vision_width),
        )

    def forward(self, vision: Tensor, text: Tensor) -> Tensor:
        t = self.fc(text)  # (n, D_v)
        attn = torch.softmax(vision @ t.t() / math.sqrt(t.shape[-1]), dim=-1)  # (n, n)
        return self.mlp(self.ln(attn @ t))  # (n, D_v); no residual


class _RecordLastBlocks(TowerHooks):
    """Delegates to `inner` and keeps the outputs of the blocks listed in `keep`."""

    def __init__(self, inner: TowerHooks, keep: set[int]):
        self.inner, self.keep, self.outputs = inner, keep, {}

    def on_input(self, x: Tensor) -> Tensor:
        return self.inner.on_input(x)

    def before_block(self, index: int, x: Tensor) -> Tensor:
        return self.inner.before_block(index, x)

    def after_block(self, index: int, block: nn.Module, x_in: Tensor, x_out: Tensor) -> Tensor:
        x_out = self.inner.after_block(index, block, x_in, x_out)
        if index in self.keep:
            self.outputs[index] = x_out
        return x_out


@register_method
class COMMA(HeadMethod):
    name = "comma"
    Config = COMMAConfig
    towers = ("text", "vision")
    summary = "MaPLe layout; vision prompts generated from both branches' previous prompts + text KD loss"

    def __init__(self, config: COMMAConfig, backbone, tasks):
        super().__init__(config, backbone, tasks)
        c = config
        depth = clip_depth(self.name, c.depth, backbone.text_blocks, backbone.vision_blocks)
        n_text_blocks = len(backbone.text_blocks)
        if not 1 <= c.kd_last_layers <= n_text_blocks:
            raise MethodError(f"comma: kd_last_layers must be in 1..{n_text_blocks}, got {c.kd_last_layers}")
        d_t, d_v = backbone.text_width, backbone.vision_width
        if d_v // c.generator_reduction < 1:
            raise MethodError(f"comma: vision width {d_v} // generator_reduction {c.generator_reduction} is 0")
        self.text = DeepTextPrompts(backbone, c.n_ctx, depth, c.ctx_init, c.init_std)
        self.proj = nn.Linear(d_t, d_v)  # F_0
        self.generators = nn.ModuleList(PromptGenerator(d_t, d_v, c.generator_reduction) for _ in range(depth - 1))
        self.compound_prompts_image = nn.Parameter(torch.randn(depth - 1, c.n_ctx, d_v) * c.init_std)
        self.kd_blocks = tuple(range(n_text_blocks - c.kd_last_layers, n_text_blocks))
        self._teacher: dict[tuple, list[Tensor]] = {}  # (sentences, device) -> [(C, L, D_t)] normalized
        self._student: Optional[tuple] = None  # (key, param versions, grad mode, [(C, L, D_t)])

    # ---- vision prompts ---------------------------------------------------------------------
    def vision_prompts(self) -> list[Tensor]:
        """[P_v^0, ..., P_v^{J-1}], each (n, D_v), from text-side parameters and G only."""
        text = self.text.layers()
        vis = [self.proj(text[0])]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.detach_generator):
            for b, g in enumerate(self.generators, start=1):
                prev_v, prev_t = vis[-1], text[b - 1]
                if self.config.detach_generator:
                    prev_v, prev_t = prev_v.detach(), prev_t.detach()
                vis.append(g(prev_v, prev_t))
        return vis

    def image_hooks(self, task: int = 0) -> TowerHooks:
        vis = self.vision_prompts()
        if len(vis) > 1 and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            with torch.no_grad():  # the record of the last generated deep prompts (see module doc)
                self.compound_prompts_image.copy_(torch.stack(vis[1:]))
            if self.config.detach_generator and torch.is_grad_enabled():
                vis = vis[:1] + list(self.compound_prompts_image.unbind(0))  # the released code's `.data` rows
        return PromptHooks(shallow=vis[0], deep={b: vis[b] for b in range(1, len(vis))})

    # ---- text side and distillation -----------------------------------------------------------
    def _text_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.text.parameters())

    def _student_tokens(self, classnames: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """Class matrix (C, E) and the outputs of the distilled blocks, [(C, L, D_t)]."""
        rec = _RecordLastBlocks(self.text.hooks(), set(self.kd_blocks))
        feats = self.text.encode(classnames, hooks=rec)
        return feats, [rec.outputs[i] for i in self.kd_blocks]

    def text_features(self, classnames: Sequence[str], task: int = 0) -> Tensor:
        feats, tokens = self._student_tokens(classnames)
        if torch.is_grad_enabled():  # keep them for extra_loss in the same step
            self._student = ((task, tuple(classnames)), self._text_versions(), tokens)
        else:
            self._student = None
        return feats

    def teacher_sentences(self, task: int, classnames: Sequence[str]) -> list[str]:
        spec = self.tasks[task]
        template = self.config.teacher_template
        if template is None:
            known = canonical_dataset_name(spec.name) is not None
            template = templates_for(spec.name, "comma_teacher")[0] if known else spec.templates[0]
        return [template.format(clean_classname(c)) for c in classnames]

    def teacher_tokens(self, task: int, classnames: Sequence[str]) -> list[Tensor]:
        """Frozen CLIP's distilled block outputs on the teacher sentences, normalized per token."""
        sentences = tuple(self.teacher_sentences(task, classnames))
        device = self.text.ctx.device
        key = (sentences, str(device))
        if key not in self._teacher:
            rec = _RecordLastBlocks(NO_HOOKS, set(self.kd_blocks))
            with torch.no_grad():
                self.backbone.encode_text(self.backbone.tokenize(sentences).to(device), rec, return_tokens=True)
            self._teacher[key] = [F.normalize(rec.outputs[i].float(), dim=-1) for i in self.kd_blocks]
        return self._teacher[key]

    def distillation_loss(self, task: int, classnames: Sequence[str]) -> Tensor:
        """L_kd = mean over distilled blocks of (1 - mean_{c,t} cos(h_{c,t}, h_hat_{c,t}))."""
        cached, self._student = self._student, None
        if cached is not None and cached[0] == (task, tuple(classnames)) and cached[1] == self._text_versions():
            student = cached[2]
        else:
            student = self._student_tokens(classnames)[1]
        teacher = self.teacher_tokens(task, classnames)
        terms = [1.0 - F.cosine_similarity(s, t.to(s.dtype), dim=-1, eps=1e-7).mean() for s, t in zip(student, teacher)]
        return torch.stack(terms).mean()

    def extra_loss(self, task: int, classnames: Sequence[str]) -> Optional[Tensor]:
        if self.config.kd_weight == 0:
            return None
        return self.config.kd_weight * self.distillation_loss(task, classnames)
