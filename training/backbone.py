"""A frozen open_clip model run tower by tower, block by block, with hooks for heads.

Methods never re-implement a transformer. They say *what* to insert through `TowerHooks`:

* `on_input(x)`        token sequence after the positional embedding (vision: before `ln_pre`);
                       shallow prompts are appended here.
* `before_block(i, x)` the sequence entering block i (deep prompts overwrite their slots here).
* `after_block(i, block, x_in, x_out)`  a side branch on block i (adapters add to `x_out`).

All hook tensors are batch-first `(N, L, D)` whatever convention the open_clip blocks use.
Tokens a hook appends to the vision sequence are dropped again before pooling, so the pooled
feature is always the class token (or whatever the tower pools) of the original sequence.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone_source import PACKAGED_TAG, BackboneError, WeightsSource, resolve_weights  # noqa: F401 (re-exported)
from .files import file_sha256
from .text_length import text_length, trimming
from .preprocess import PreprocessSpec  # noqa: F401 - re-exported: heads and bundles import it from here

PACKAGED_ARCH = "clipheads-tiny"
_PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
PACKAGED_WEIGHTS = _PACKAGE_DIR / "weights" / f"{PACKAGED_ARCH}.safetensors"
PACKAGED_ACT = "gelu"  # what the packaged weights were trained with (training/pretrain.py)


class TowerHooks:
    """Identity hooks; a method overrides only what it changes."""

    def on_input(self, x: Tensor) -> Tensor:
        return x

    def before_block(self, index: int, x: Tensor) -> Tensor:
        return x

    def after_block(self, index: int, block: nn.Module, x_in: Tensor, x_out: Tensor) -> Tensor:
        return x_out


NO_HOOKS = TowerHooks()


def register_packaged_configs() -> None:
    """Make the package's own architectures (e.g. `clipheads-tiny`) known to open_clip."""
    import open_clip

    if PACKAGED_ARCH not in open_clip.list_models():
        open_clip.add_model_config(PACKAGED_CONFIG_DIR)


def default_pretrained(arch: str) -> str:
    """The tag `--pretrained` defaults to: our packaged weights, else `openai`, else the first tag."""
    import open_clip

    if arch == PACKAGED_ARCH:
        return PACKAGED_TAG
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if "openai" in tags:
        return "openai"
    return tags[0] if tags else "none"


def _weights_help(arch: str, pretrained: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"could not load weights {pretrained!r} for {arch!r} ({type(err).__name__}: {err}).\n"
        "Weights are not downloadable here. Supply them one of these ways:\n"
        f"  --pretrained /path/to/open_clip_model.safetensors   (a local open_clip checkpoint for {arch}; add --act)\n"
        "  put them in the Hugging Face cache on a connected machine (HF_HOME) and copy it over; set HF_HUB_OFFLINE=1,\n"
        "  an OpenAI .pt download: clipheads convert FILE.pt --out FILE.safetensors --trust-torchscript,\n"
        "  --pretrained none                                      (random init: tests and speed benchmarks),\n"
        f"  or use the packaged model: --backbone {PACKAGED_ARCH} (pretrained on the synthetic world)."
    )


def resolve_request(arch: str = PACKAGED_ARCH, pretrained: Optional[str] = None, act: Optional[str] = None) -> WeightsSource:
    """`--backbone/--pretrained/--act` -> a WeightsSource (backbone_source.py has the rule); the
    packaged tag resolves to the packaged weights file. Loads nothing."""
    register_packaged_configs()
    pretrained = default_pretrained(arch) if pretrained in (None, "", "default") else pretrained
    if pretrained == PACKAGED_TAG and arch == PACKAGED_ARCH:
        if not PACKAGED_WEIGHTS.exists():
            raise BackboneError(f"packaged weights missing at {PACKAGED_WEIGHTS}; reinstall clipheads")
        if act not in (None, PACKAGED_ACT):  # the file carries no activation record: we know it
            raise BackboneError(f"the packaged {PACKAGED_ARCH} weights were trained with {PACKAGED_ACT}; "
                                f"--act {act} would run them unfaithfully")
        src = resolve_weights(arch, str(PACKAGED_WEIGHTS), act)
        return WeightsSource(src.kind, arch, src.model_name, PACKAGED_TAG, src.checkpoint, src.act, src.act_reason)
    return resolve_weights(arch, pretrained, act)


def _weights_file(src: WeightsSource) -> Optional[str]:
    """The file open_clip read the weights from (already in the cache once the model is built)."""
    import open_clip
    from open_clip.pretrained import download_pretrained_from_hf

    if src.kind == "file":
        return src.checkpoint
    if src.kind == "tag":
        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(src.model_name, src.checkpoint)) or None
    if src.kind == "hf-hub":
        return download_pretrained_from_hf(src.model_name[len("hf-hub:"):])
    return None


class _DropRandomInitNotice(logging.Filter):
    """open_clip's root-logger warning that a model "initialized randomly": asked for with
    `--pretrained none`, which our own backbone line reports (and -q silences)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _random_init_is_no_warning():
    root, quiet = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


@contextlib.contextmanager
def _named_for_its_format(src: WeightsSource):
    """`src.checkpoint`, under a name ending `.safetensors` when it holds safetensors bytes: open_clip
    picks its loader by the suffix, and a `weights.bin` of safetensors bytes would go to torch.load
    (an unreadable-file error). A symlink in a temporary folder; the recorded path stays the user's."""
    from .files import read_safetensors_header

    path = src.checkpoint
    if src.kind != "file" or path is None or path.endswith(".safetensors") or read_safetensors_header(path) is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clipheads-weights-") as tmp:
        link = Path(tmp) / (Path(path).name + ".safetensors")
        link.symlink_to(Path(path).resolve())
        yield str(link)


def load_backbone(arch: str = PACKAGED_ARCH, pretrained: Optional[str] = None, device: str = "cpu",
                  act: Optional[str] = None) -> "Backbone":
    """Build a frozen open_clip model. `pretrained`: tag | local path | `hf-hub:ID` | `none`;
    `act`: quickgelu | gelu | None (decided by the weights; backbone_source.py)."""
    import open_clip

    src = resolve_request(arch, pretrained, act)
    needs_weights = src.kind != "none"
    try:
        with contextlib.nullcontext() if needs_weights else _random_init_is_no_warning(), \
                _named_for_its_format(src) as checkpoint:
            model = open_clip.create_model(src.model_name, pretrained=checkpoint, device=device,
                                           force_quick_gelu=src.quick_gelu, require_pretrained=needs_weights)
        weights_file = _weights_file(src)
    except Exception as err:  # network errors, missing files, bad checkpoints
        if not needs_weights:
            raise
        raise _weights_help(src.arch, src.pretrained, err) from err
    bb = Backbone(model, open_clip.get_tokenizer(src.model_name), arch=src.arch, pretrained=src.pretrained,
                  weights_sha256=file_sha256(weights_file) if weights_file else None, weights_file=weights_file,
                  act_reason=src.act_reason)
    if detect_act(model) != src.act:
        raise BackboneError(f"open_clip built {src.arch} with {detect_act(model)} although {src.act} was asked for "
                            f"({src.act_reason}); this architecture cannot run these weights faithfully")
    return bb


def detect_act(model: nn.Module) -> str:
    """quickgelu if any block runs QuickGELU (OpenAI's activation), else gelu. Read from the built
    modules, so the record says what actually runs."""
    from open_clip.transformer import QuickGELU

    return "quickgelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"


class _TextTower:
    """Uniform access to the parts of open_clip's two text layouts (CLIP vs CustomTextCLIP)."""

    def __init__(self, model: nn.Module):
        owner = model.text if hasattr(model, "text") else model
        self.supported = all(
            hasattr(owner, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        ) and getattr(owner, "cls_emb", None) is None and not getattr(owner, "use_pad_mask", False)
        self.owner = owner
        if not self.supported:
            return
        self.token_embedding = owner.token_embedding
        self.positional_embedding = owner.positional_embedding
        self.transformer = owner.transformer
        self.ln_final = owner.ln_final
        self.text_projection = owner.text_projection
        self.pool_type = getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax"))
        self.eos_id = getattr(owner, "text_eos_id", getattr(owner, "eos_id", None))

    @property
    def attn_mask(self) -> Optional[Tensor]:
        return getattr(self.owner, "attn_mask", None)


def _run_blocks(transformer: nn.Module, x: Tensor, hooks: TowerHooks, attn_mask: Optional[Tensor]) -> Tensor:
    """Run open_clip resblocks one by one; x stays batch-first (N, L, D) between blocks."""
    seq_first = not getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        x = hooks.before_block(i, x)
        x_in = x
        if seq_first:  # block wants (L, N, D)
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        else:
            x = block(x, attn_mask=attn_mask)
        x = hooks.after_block(i, block, x_in, x)
    return x


class Backbone(nn.Module):
    """Frozen open_clip CLIP with hookable towers. Parameters never require grad."""

    def __init__(self, model: nn.Module, tokenizer, arch: str, pretrained: str, weights_sha256: Optional[str] = None,
                 weights_file: Optional[str] = None, act_reason: str = "", act: Optional[str] = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.arch = arch
        self.pretrained = pretrained
        self.weights_sha256 = weights_sha256
        self.weights_file = weights_file  # where the weights were read (says which file a command used)
        self.act = act or detect_act(model)  # quickgelu | gelu: recorded with every head and bundle
        self.act_reason = act_reason or "the built model's activation modules"
        self._text = _TextTower(model)
        visual = model.visual
        self.vision_is_vit = all(hasattr(visual, a) for a in ("conv1", "class_embedding", "ln_pre", "transformer"))

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def text_supports_prompts(self) -> bool:
        return self._text.supported

    @property
    def context_length(self) -> int:
        return int(getattr(self.model, "context_length", None) or self.tokenizer.context_length)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def text_width(self) -> int:
        self.require_text_tower("text prompts")
        return int(self._text.token_embedding.weight.shape[1])

    @property
    def vision_width(self) -> int:
        self.require_vit("vision prompts")
        return int(self.model.visual.class_embedding.shape[-1])

    @property
    def text_blocks(self) -> nn.ModuleList:
        self.require_text_tower("text blocks")
        return self._text.transformer.resblocks

    @property
    def vision_blocks(self) -> nn.ModuleList:
        self.require_vit("vision blocks")
        return self.model.visual.transformer.resblocks

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    @property
    def preprocess(self) -> PreprocessSpec:
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", self.model.visual.image_size)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return PreprocessSpec(
            image_size=int(size),
            mean=tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
        )

    def require_vit(self, what: str) -> None:
        if not self.vision_is_vit:
            raise BackboneError(
                f"{what} need an open_clip VisionTransformer image tower; {self.arch!r} has "
                f"{type(self.model.visual).__name__}. Use a text-only method (zeroshot, coop) or a ViT backbone."
            )

    def require_text_tower(self, what: str) -> None:
        if not self._text.supported:
            raise BackboneError(
                f"{what} need an open_clip CLIP text transformer with causal mask; {self.arch!r}'s text tower "
                f"({type(self._text.owner).__name__}) is not supported by prompt methods. Use zeroshot."
            )

    def train(self, mode: bool = True) -> "Backbone":
        # The backbone stays in eval mode (dropout/patch-dropout off) even while a head trains.
        return super().train(False)

    # ---- text -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids on the backbone's device (so callers never juggle devices)."""
        return self.tokenizer(list(texts)).to(self.device)

    @property
    def text_pool(self) -> tuple[Optional[str], Optional[int]]:
        """(pool type, eos id) of the text tower: the position its features are read from."""
        return (self._text.pool_type, self._text.eos_id) if self._text.supported else (None, None)

    def trimmed_length(self, tokens: Tensor) -> Optional[int]:
        """The bucketed length that gives `tokens` the same features, or None if this tower
        cannot be trimmed (see text_length.py)."""
        t = self._text
        if not t.supported:
            return None
        return text_length(tokens, t.pool_type, t.eos_id, causal=t.attn_mask is not None)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N, L, D_t) frozen word embeddings."""
        self.require_text_tower("token embeddings")
        return self._text.token_embedding(tokens)

    def encode_text(
        self,
        tokens: Tensor,
        hooks: TowerHooks = NO_HOOKS,
        embeddings: Optional[Tensor] = None,
        normalize: bool = True,
        return_tokens: bool = False,
        trim: Optional[bool] = None,
    ):
        """Text features pooled at the EOT of `tokens`. `embeddings` (N, L, D_t) replaces the word
        embeddings (prompt learners splice their vectors there). `return_tokens` also returns the
        last block's output (N, L, D_t) before `ln_final` (used by COMMA's distillation).
        `trim`: run only the bucketed used length (`text_length.py`; same features); None follows
        `trimmed_text()`. Never with `return_tokens`. Shorter-than-context tokens are accepted."""
        if trim is None:
            trim = trimming()
        length = self.trimmed_length(tokens) if trim and not return_tokens else None
        if length is not None and length < tokens.shape[1]:
            tokens = tokens[:, :length]
            embeddings = embeddings[:, :length] if embeddings is not None else None
        full = tokens.shape[1] == self.context_length
        if hooks is NO_HOOKS and embeddings is None and not return_tokens and full:
            feats = self.model.encode_text(tokens)
            return F.normalize(feats, dim=-1) if normalize else feats
        t = self._text
        self.require_text_tower("text hooks" if full else "a text length below the context")
        x = embeddings if embeddings is not None else t.token_embedding(tokens)
        x = x + t.positional_embedding[: x.shape[1]].to(x.dtype)
        x = hooks.on_input(x)
        mask = t.attn_mask
        if mask is not None and mask.shape[0] != x.shape[1]:
            mask = mask[: x.shape[1], : x.shape[1]]  # the causal mask of the shorter sequence
        x = _run_blocks(t.transformer, x, hooks, mask)
        last = x
        x = t.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, tokens, t.pool_type, eos_token_id=t.eos_id)
        if t.text_projection is not None:
            x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
        x = F.normalize(x, dim=-1) if normalize else x
        return (x, last) if return_tokens else x

    # ---- vision -----------------------------------------------------------------------------
    def encode_image(self, images: Tensor, hooks: TowerHooks = NO_HOOKS, normalize: bool = True) -> Tensor:
        """(N, 3, H, W) normalized pixels -> (N, E) image features."""
        if hooks is NO_HOOKS:
            feats = self.model.encode_image(images)
            return F.normalize(feats, dim=-1) if normalize else feats
        self.require_vit("vision hooks")
        v = self.model.visual
        x = v.conv1(images)  # (N, D, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, D)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (N, 1+g*g, D)
        x = v.patch_dropout(x)
        n_tokens = x.shape[1]
        x = hooks.on_input(x)  # (N, 1+g*g+P, D): prompts appended after the patches
        x = v.ln_pre(x)
        x = _run_blocks(v.transformer, x, hooks, None)
        x = x[:, :n_tokens]  # drop prompt slots before pooling
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def record(self) -> dict:
        """What defines this backbone's forward, as heads and bundles record it (backbone_record.py)."""
        from .backbone_record import backbone_record

        return backbone_record(self)

    def describe_weights(self) -> str:
        """One line naming the weights file a command used (or why there is none)."""
        act = "QuickGELU" if self.act == "quickgelu" else "GELU"
        if not self.weights_file:
            return f"{self.arch} ({act}), random init ({self.pretrained})"
        return f"{self.arch} ({act}), weights {self.weights_file} (sha256 {str(self.weights_sha256)[:12]}…)"

    def parameters_checksum(self) -> str:
        """sha256 over every backbone tensor: proves training left the backbone untouched."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
