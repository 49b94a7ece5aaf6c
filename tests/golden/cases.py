"""Golden equivalence cases: what the official code and ours both run on, and how to compare.

Shared by the maintenance script (`make_golden.py`, which also runs the official code) and the CI
test (`tests/test_golden_methods.py`, which runs only ours against the committed fixtures). Nothing
here imports or contains official code.

The shared world:
* one random-init CLIP in OpenAI's state-dict format (open_clip's `-quickgelu` / `quick_gelu`
  architectures use the same 302 keys), every tensor drawn from a generator seeded by its name and
  rounded to fp16-exact values, so OpenAI's `build_model` (which stores Linear/conv weights in
  fp16) loads it without loss; both sides then compute in fp32 with QuickGELU;
* fixed images, class names, labels and task name (COMMA's teacher template is picked by it);
* the learnable tensors: drawn per *official* parameter name (seeded by the name) and copied into
  both implementations; `Case.rules` maps each official name to our parameter (and row, where
  ours stacks per-block tensors into one parameter).

Two geometries: `REDUCED_ARCH` (ViT-B/16 widths, which MaPLe/COMMA hard-code as 512/768, but 4
blocks per tower and 64 px) for the committed fixtures, and `FULL_ARCH` (ViT-B/16, 224 px) for the
full-size check the script runs by hand. Prompt depths are set below the tower depth in the reduced
variants so that both prompted and carried blocks are exercised.

Gradients of tensors above `SKETCH_ABOVE` elements are stored as a CountSketch (each element
added, with a random sign, into one of `SKETCH_BUCKETS` buckets; both seeded by the name). The
sketch is linear, so ||S(a - b)|| / ||S(b)|| estimates the relative error ||a - b|| / ||b||
(unbiased squared norms, spread about sqrt(2 / buckets) = 1.6%); fixtures stay small.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
FIXTURE_DIR = HERE / "fixtures"
CONFIG_DIR = HERE / "model_configs"

REDUCED_ARCH = "golden-vit-b16-4l"  # model_configs/golden-vit-b16-4l.json
FULL_ARCH = "ViT-B-16-quickgelu"
IMAGE_SIZE = {REDUCED_ARCH: 64, FULL_ARCH: 224}

WEIGHT_SEED = 1414  # shared CLIP weights
VALUE_SEED = 2414  # learnable tensors
INPUT_SEED = 3414  # images
CLASSNAMES = ("banded", "golden_retriever", "Boeing 737-200", "Annual Crop Land")
LABELS = (1, 3)
N_IMAGES = len(LABELS)
DATASET = "DescribableTextures"  # COMMA's teacher template for it differs from CoOp's

SKETCH_ABOVE = 16_384
SKETCH_BUCKETS = 8_192

# Acceptance (issue 14): logits within 1e-4, every gradient within 1e-4 relative, losses within 1e-4.
LOGIT_TOL = 1e-4
GRAD_TOL = 1e-4
LOSS_TOL = 1e-4


# ---- the shared CLIP ------------------------------------------------------------------------
def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def _randn(shape: Sequence[int], *seed_parts: object) -> Tensor:
    g = torch.Generator().manual_seed(_seed(*seed_parts))
    return torch.randn(tuple(shape), generator=g)


def _clip_init(name: str, shape: torch.Size) -> Tensor:
    """CLIP-like scales, with non-trivial biases and LayerNorm gains (zeros/ones hide bugs)."""
    if name == "logit_scale":
        return torch.tensor(4.605170185988091)  # ln(100), OpenAI's trained value
    x = _randn(shape, WEIGHT_SEED, name)
    leaf = name.rsplit(".", 1)[-1]
    if ".ln_" in name or name.startswith("ln_"):
        return 1.0 + 0.1 * x if leaf == "weight" else 0.05 * x
    if leaf.endswith("bias"):
        return 0.02 * x
    if name == "token_embedding.weight":
        return 0.02 * x
    if name == "positional_embedding":
        return 0.01 * x
    if name in ("visual.class_embedding", "visual.positional_embedding"):
        return x * shape[-1] ** -0.5
    if name in ("text_projection", "visual.proj"):  # (in, out)
        return x * shape[0] ** -0.5
    fan_in = shape[1:].numel()  # (out, in[, kh, kw])
    return x * fan_in ** -0.5


def register_configs() -> None:
    import open_clip

    if REDUCED_ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def open_clip_model(arch: str):
    """An fp32 open_clip CLIP with QuickGELU, loaded with the shared weights (strict)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    register_configs()
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
    with torch.no_grad():  # in place: every tensor of the state dict (all parameters here)
        for name, tensor in model.state_dict().items():
            tensor.copy_(_clip_init(name, tensor.shape).half())
    acts = {type(b.mlp.gelu) for b in list(model.transformer.resblocks) + list(model.visual.transformer.resblocks)}
    if acts != {QuickGELU}:
        raise RuntimeError(f"expected QuickGELU everywhere, got {acts}")
    return model.eval()


def our_backbone(arch: str):
    import open_clip

    from clipheads.training.backbone import Backbone

    return Backbone(open_clip_model(arch), open_clip.get_tokenizer(arch), arch=arch, pretrained="none")


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def images(arch: str) -> Tensor:
    s = IMAGE_SIZE[arch]
    return _randn((N_IMAGES, 3, s, s), INPUT_SEED, arch)


def labels() -> Tensor:
    return torch.tensor(LABELS)


# ---- learnable tensors ----------------------------------------------------------------------
def learnable_value(name: str, shape: Sequence[int]) -> Tensor:
    """The value both implementations get for the official parameter `name`."""
    x = _randn(shape, VALUE_SEED, name)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("ln.weight"):  # COMMA generator's LayerNorm
        return 1.0 + 0.1 * x
    if leaf == "bias":
        return 0.02 * x
    if leaf == "weight" and len(shape) == 2:  # Linear (out, in)
        return x * shape[1] ** -0.5
    return 0.02 * x  # context vectors and prompts


@dataclass(frozen=True)
class Link:
    """Where an official parameter lives in our head: a parameter name and, where ours stacks
    per-block tensors into one parameter, the row of it."""

    ours: str
    row: Optional[int] = None

    def to_json(self) -> list:
        return [self.ours, self.row]


Rule = tuple[str, Callable[[re.Match], Link]]


@dataclass(frozen=True)
class Variant:
    """One geometry of a case: our method config and the official cfg overrides that match it."""

    config: Mapping[str, object]
    overrides: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Case:
    name: str  # fixture file stem
    method: str  # our registry name
    repo: str  # official repository (owner/name)
    trainer: str  # official trainer, "module:Class"
    yaml: str  # official trainer config, relative to the repository
    prec_key: str  # cfg key of the trainer's precision (set to fp32)
    rules: Callable[[Variant], tuple[Rule, ...]]
    reduced: Variant
    full: Variant
    phrase_init: bool = False  # ctx starts from "a photo of a": compare the initial ctx too
    paper_mode: bool = False  # COMMA: the official `.data` writes replaced by a graph-keeping list
    notes: str = ""
    known_difference: str = ""  # set: ours deliberately differs; reported by the script, no fixture

    def variant(self, arch: str) -> Variant:
        return self.reduced if arch == REDUCED_ARCH else self.full

    def link(self, variant: Variant, official_name: str) -> Link:
        for pattern, to_link in self.rules(variant):
            m = re.fullmatch(pattern, official_name)
            if m:
                return to_link(m)
        raise KeyError(f"{self.name}: no rule maps official parameter {official_name!r}")


def _fixed(ours: str, row: Optional[int] = None) -> Callable[[re.Match], Link]:
    return lambda m: Link(ours, row)


CTX = (r"prompt_learner\.ctx", _fixed("ctx"))
TEXT_CTX = (r"prompt_learner\.ctx", _fixed("text.ctx"))


def _coop_rules(v: Variant) -> tuple[Rule, ...]:
    return (CTX,)


def _cocoop_rules(v: Variant) -> tuple[Rule, ...]:
    return (
        CTX,
        (r"prompt_learner\.meta_net\.linear1\.(weight|bias)", lambda m: Link(f"meta_net.0.{m[1]}")),
        (r"prompt_learner\.meta_net\.linear2\.(weight|bias)", lambda m: Link(f"meta_net.2.{m[1]}")),
    )


def _vpt_rules(v: Variant) -> tuple[Rule, ...]:
    return (
        (r"image_encoder\.VPT", _fixed("prompts", 0)),
        (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", lambda m: Link("prompts", int(m[1]))),
    )


def _ivlp_rules(v: Variant) -> tuple[Rule, ...]:
    return (
        TEXT_CTX,
        (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", lambda m: Link("text.deep", int(m[1]) - 1)),
        (r"image_encoder\.VPT", _fixed("vision", 0)),
        (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", lambda m: Link("vision", int(m[1]))),
    )


def _maple_rules(v: Variant) -> tuple[Rule, ...]:
    return (
        TEXT_CTX,
        (r"prompt_learner\.compound_prompts_text\.(\d+)", lambda m: Link("text.deep", int(m[1]))),
        (r"prompt_learner\.proj\.(weight|bias)", lambda m: Link(f"proj.0.{m[1]}")),
        (r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)",
         lambda m: Link(f"proj.{int(m[1]) + 1}.{m[2]}")),
    )


def _comma_rules(v: Variant) -> tuple[Rule, ...]:
    return (
        TEXT_CTX,
        (r"prompt_learner\.compound_prompts_text", _fixed("text.deep")),
        (r"prompt_learner\.compound_prompts_image", _fixed("compound_prompts_image")),
        (r"prompt_learner\.proj\.(weight|bias)", lambda m: Link(f"proj.{m[1]}")),
        (r"prompt_learner\.compound_prompt_projections_image_base\.(.+)", lambda m: Link(f"generators.0.{m[1]}")),
        (r"prompt_learner\.compound_prompt_projections_image\.(\d+)\.(.+)",
         lambda m: Link(f"generators.{int(m[1]) + 1}.{m[2]}")),
    )


def _mma_rules(v: Variant) -> tuple[Rule, ...]:
    # official adapters are indexed by 1-based block k (ADAPTER_START..ADAPTER_END); ours by level
    # = position among the adapted blocks, so level = k - ADAPTER_START.
    start = dict(v.overrides).get("TRAINER.MMADAPTER.ADAPTER_START", 5)
    tower = {"text": "text", "visual": "vision"}
    return (
        (r"adapter_learner\.(text|visual)_adapter\.(\d+)\.down\.0\.(weight|bias)",
         lambda m: Link(f"{tower[m[1]]}_down.{int(m[2]) - start}.{m[3]}")),
        (r"adapter_learner\.(text|visual)_adapter\.(\d+)\.up\.(weight|bias)",
         lambda m: Link(f"{tower[m[1]]}_up.{int(m[2]) - start}.{m[3]}")),
        (r"adapter_learner\.shared_adapter\.(\d+)\.0\.(weight|bias)",
         lambda m: Link(f"shared.{int(m[1]) - start}.{m[2]}")),
    )


COOP_REPO = "KaiyangZhou/CoOp"
MAPLE_REPO = "muzairkhattak/multimodal-prompt-learning"
MMA_REPO = "ZjjConan/Multi-Modal-Adapter"
COMMA_REPO = "hulianyuyy/COMMA"
REPOS = (COOP_REPO, MAPLE_REPO, MMA_REPO, COMMA_REPO)

_COMMA_REDUCED = (("TRAINER.COMMA.PROMPT_DEPTH", 3), ("TRAINER.COMMA.LAST_LAYER", 1))

CASES: tuple[Case, ...] = (
    Case("coop", "coop", COOP_REPO, "trainers.coop:CoOp", "configs/trainers/CoOp/vit_b16.yaml",
         "TRAINER.COOP.PREC", _coop_rules, Variant({"n_ctx": 16}), Variant({}),
         notes="M=16, random init, class token at the end"),
    Case("coop_ctxv1", "coop", COOP_REPO, "trainers.coop:CoOp", "configs/trainers/CoOp/vit_b16_ctxv1.yaml",
         "TRAINER.COOP.PREC", _coop_rules, Variant({"n_ctx": 4, "ctx_init": "a photo of a"}),
         Variant({"n_ctx": 4, "ctx_init": "a photo of a"}), phrase_init=True, notes='M=4 from "a photo of a"'),
    Case("coop_csc_middle", "coop", COOP_REPO, "trainers.coop:CoOp", "configs/trainers/CoOp/vit_b16.yaml",
         "TRAINER.COOP.PREC", _coop_rules,
         Variant({"n_ctx": 16, "class_specific": True, "class_token_position": "middle"},
                 (("TRAINER.COOP.CSC", True), ("TRAINER.COOP.CLASS_TOKEN_POSITION", "middle"))),
         Variant({"n_ctx": 16, "class_specific": True, "class_token_position": "middle"},
                 (("TRAINER.COOP.CSC", True), ("TRAINER.COOP.CLASS_TOKEN_POSITION", "middle"))),
         notes="class-specific context, class name in the middle"),
    Case("cocoop", "cocoop", COOP_REPO, "trainers.cocoop:CoCoOp",
         "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml", "TRAINER.COCOOP.PREC", _cocoop_rules,
         Variant({}), Variant({}), phrase_init=True, notes="M=4 + Meta-Net"),
    Case("vpt", "vpt", MAPLE_REPO, "trainers.vpt:VPT", "configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml",
         "TRAINER.VPT.PREC", _vpt_rules, Variant({"depth": 3}, (("TRAINER.VPT.PROMPT_DEPTH_VISION", 3),)),
         Variant({}), notes="deep, n=8"),
    Case("ivlp", "ivlp", MAPLE_REPO, "trainers.independentVL:IVLP",
         "configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml", "TRAINER.IVLP.PREC", _ivlp_rules,
         Variant({"text_depth": 2, "vision_depth": 3},
                 (("TRAINER.IVLP.PROMPT_DEPTH_TEXT", 2), ("TRAINER.IVLP.PROMPT_DEPTH_VISION", 3))),
         Variant({}), phrase_init=True, notes="2+2 tokens"),
    Case("maple", "maple", MAPLE_REPO, "trainers.maple:MaPLe", "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
         "TRAINER.MAPLE.PREC", _maple_rules, Variant({"depth": 3}, (("TRAINER.MAPLE.PROMPT_DEPTH", 3),)),
         Variant({}), phrase_init=True, notes="n=2"),
    Case("mma", "mma", MMA_REPO, "trainers.mmadapter:MultiModalAdapter",
         "configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml", "TRAINER.MMADAPTER.PREC", _mma_rules,
         Variant({"blocks": (1, 2, 3)},
                 (("TRAINER.MMADAPTER.ADAPTER_START", 2), ("TRAINER.MMADAPTER.ADAPTER_END", 4))),
         Variant({}), notes="r=32, alpha=0.001, gradient-scale trick"),
    Case("comma", "comma", COMMA_REPO, "trainers.comma:COMMA", "configs/trainers/COMMA/vit_b16_c2_ep5_batch4_2ctx.yaml",
         "TRAINER.COMMA.PREC", _comma_rules, Variant({"depth": 3}, _COMMA_REDUCED), Variant({}),
         phrase_init=True, paper_mode=True,
         notes="paper mode (gradients through the generators); official `.data` writes replaced by a list"),
    Case("comma_released", "comma", COMMA_REPO, "trainers.comma:COMMA",
         "configs/trainers/COMMA/vit_b16_c2_ep5_batch4_2ctx.yaml", "TRAINER.COMMA.PREC", _comma_rules,
         Variant({"depth": 3, "detach_generator": True}, _COMMA_REDUCED), Variant({"detach_generator": True}),
         phrase_init=True, notes="released code as is (`.data` writes: generators untrained)"),
    Case("comma_last2", "comma", COMMA_REPO, "trainers.comma:COMMA",
         "configs/trainers/COMMA/vit_b16_c2_ep5_batch4_2ctx.yaml", "TRAINER.COMMA.PREC", _comma_rules,
         Variant({"depth": 3, "kd_last_layers": 2},
                 (("TRAINER.COMMA.PROMPT_DEPTH", 3), ("TRAINER.COMMA.LAST_LAYER", 2))),
         Variant({"kd_last_layers": 2}, (("TRAINER.COMMA.LAST_LAYER", 2),)), phrase_init=True, paper_mode=True,
         notes="paper mode, LAST_LAYER = 2 (no shipped config uses it)",
         known_difference="official clip/model.py runs resblocks[-S] S times and never the last block, "
                          "in the student and the teacher; ours distils the real last S blocks"),
)
CASES_BY_NAME = {c.name: c for c in CASES}
GOLDEN_CASES = tuple(c for c in CASES if not c.known_difference)  # the ones with a committed fixture


# ---- running ours ---------------------------------------------------------------------------
@dataclass
class StepResult:
    """One training step: logits, loss, KD term and gradients, keyed by official parameter name
    (None = the tensor got no gradient)."""

    logits: Tensor
    loss: float
    grads: dict[str, Optional[Tensor]]
    kd: Optional[float] = None
    init: dict[str, Tensor] = field(default_factory=dict)


def _row(t: Tensor, row: Optional[int]) -> Tensor:
    return t if row is None else t[row]


def run_ours(case: Case, arch: str, backbone, shapes: Mapping[str, Sequence[int]],
             config: Optional[Mapping[str, object]] = None) -> StepResult:
    """Build our head for `case`, give it the shared learnable values, take one step.

    `shapes`: official trainable parameter names -> shapes (from the official run / fixture).
    `config` overrides the case's config (the tests use it to perturb a method)."""
    from clipheads.training.methods import TaskSpec, build_method

    variant = case.variant(arch)
    head = build_method(case.method, backbone, [TaskSpec(DATASET, CLASSNAMES)], dict(variant.config if config is None else config))
    params = dict(head.named_parameters())
    links = {name: case.link(variant, name) for name in shapes}
    init = {name: _row(params[l.ours], l.row).detach().clone() for name, l in links.items() if name == "prompt_learner.ctx"}
    covered = 0
    with torch.no_grad():
        for name, link in links.items():
            target = _row(params[link.ours], link.row)
            if tuple(target.shape) != tuple(shapes[name]):
                raise ValueError(f"{case.name}: {name} {tuple(shapes[name])} -> {link.ours}[{link.row}] {tuple(target.shape)}")
            target.copy_(learnable_value(name, shapes[name]))
            covered += target.numel()
    if covered != head.num_trainable():
        raise ValueError(f"{case.name}: the mapping covers {covered} of our {head.num_trainable()} trainable values")

    head.train()
    loss, logits = head.training_loss(images(arch), labels())
    kd = None
    if case.method == "comma" and head.config.kd_weight:  # loss = CE + weight * L_kd
        kd = float((loss - F.cross_entropy(logits, labels())).detach()) / head.config.kd_weight
    loss.backward()
    grads = {}
    for name, link in links.items():
        g = params[link.ours].grad
        grads[name] = None if g is None else _row(g, link.row).detach().clone()
    return StepResult(logits=logits.detach(), loss=float(loss.detach()), grads=grads, kd=kd, init=init)


# ---- comparing ------------------------------------------------------------------------------
def sketch(name: str, g: Tensor) -> Tensor:
    """The stored form of a gradient: itself (flattened) when small, else its CountSketch."""
    flat = g.detach().float().reshape(-1)
    if flat.numel() <= SKETCH_ABOVE:
        return flat.clone()
    gen = torch.Generator().manual_seed(_seed("sketch", name))
    bucket = torch.randint(0, SKETCH_BUCKETS, (flat.numel(),), generator=gen)
    sign = torch.randint(0, 2, (flat.numel(),), generator=gen).float() * 2 - 1
    return torch.zeros(SKETCH_BUCKETS).index_add_(0, bucket, sign * flat)


def relative_error(ours: Optional[Tensor], official: Optional[Tensor]) -> float:
    """||ours - official|| / ||official||; a missing gradient counts as zero; 0/0 = 0."""
    a = torch.zeros(()) if ours is None else ours.double()
    b = torch.zeros(()) if official is None else official.double()
    diff, ref = float((a - b).norm()), float(b.norm())
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


@dataclass(frozen=True)
class Deltas:
    max_logit: float
    loss: float
    kd: Optional[float]
    grads: dict[str, float]  # official name -> relative error

    @property
    def max_grad(self) -> float:
        return max(self.grads.values(), default=0.0)

    def failures(self) -> list[str]:
        out = []
        if not self.max_logit <= LOGIT_TOL:
            out.append(f"max |delta logit| {self.max_logit:.3g} > {LOGIT_TOL}")
        if not self.loss <= LOSS_TOL:
            out.append(f"|delta loss| {self.loss:.3g} > {LOSS_TOL}")
        if self.kd is not None and not self.kd <= LOSS_TOL:
            out.append(f"|delta knowledge-retention loss| {self.kd:.3g} > {LOSS_TOL}")
        out += [f"gradient of {n}: relative error {e:.3g} > {GRAD_TOL}" for n, e in self.grads.items() if not e <= GRAD_TOL]
        return out

    def to_json(self) -> dict:
        return {"max_abs_logit": self.max_logit, "abs_loss": self.loss, "abs_kd": self.kd,
                "max_grad_rel": self.max_grad, "grad_rel": self.grads}


def compare(ours: StepResult, official: StepResult, sketched: bool = False) -> Deltas:
    """Deltas between two steps; `sketched`: official grads are stored sketches (fixtures)."""
    grads = {}
    for name, g_off in official.grads.items():
        g_ours = ours.grads[name]
        if sketched and g_ours is not None:
            g_ours = sketch(name, g_ours)
        elif g_ours is not None:
            g_ours = g_ours.reshape(-1)
        grads[name] = relative_error(g_ours, None if g_off is None else g_off.reshape(-1))
    kd = None
    if official.kd is not None:
        kd = abs(ours.kd - official.kd) if ours.kd is not None else float("inf")
    return Deltas(
        max_logit=float((ours.logits - official.logits).abs().max()),
        loss=abs(ours.loss - official.loss),
        kd=kd,
        grads=grads,
    )
