"""Where a backbone's weights come from, and which activation they were trained with.

OpenAI's CLIP weights were trained with QuickGELU (x * sigmoid(1.702 x)); open_clip 3.3 builds
`ViT-B-16` with nn.GELU even for `pretrained='openai'` (a UserWarning) and for a local file
(silently). Features then drift a little everywhere (ImageNet zero-shot 64.4 instead of 68.3,
open_clip#1109), so the activation is decided here, by one rule, before a model is built:

1. Collect every *statement* about the activation: `--act`, a `-quickgelu` architecture name,
   the weights' own record (a tag's pretrained config, an `hf-hub:` repo's open_clip_config.json,
   the metadata `clipheads convert` writes into a safetensors file, an architecture config that
   sets `quick_gelu`).
2. Statements that disagree are an error whose message says how to fix the command.
3. No statement: random init and unambiguous architectures use the config's default; a local
   file on an architecture that has both GELU and QuickGELU weights (ViT-B-16, RN50, ...) must be
   told which (`--act` or the `-quickgelu` name): guessing is what went wrong before.

OpenAI's original `.pt` files are TorchScript archives; loading one runs code from the file, so
they are refused here and converted once with `clipheads convert --trust-torchscript`.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ACTS = ("quickgelu", "gelu")
QUICKGELU_SUFFIX = "-quickgelu"
HF_PREFIX = "hf-hub:"
NO_WEIGHTS = "none"
PACKAGED_TAG = "clipheads"  # the weights that ship with clipheads (backbone.PACKAGED_WEIGHTS)
WEIGHTS_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# safetensors metadata key under which `clipheads convert` states what a weights file holds
WEIGHTS_METADATA_KEY = "clipheads.weights"


class BackboneError(ValueError):
    """Bad backbone request (unknown arch, missing weights, activation mismatch, unusable tower)."""


@dataclass(frozen=True)
class ActStatement:
    """One claim about the activation the weights need, with where it came from."""

    act: str  # quickgelu | gelu
    source: str  # human-readable origin, e.g. "the 'openai' tag's pretrained config"
    undo: str  # how the user withdraws this claim, e.g. "drop --act gelu"
    from_weights: bool = False  # the weights' own record (tag/hub config, file metadata)


@dataclass(frozen=True)
class WeightsSource:
    """A resolved `--backbone/--pretrained/--act` request, ready for open_clip.create_model."""

    kind: str  # tag | file | hf-hub | none
    arch: str  # recorded architecture name (the hf-hub id for hub models)
    model_name: str  # open_clip.create_model's first argument
    pretrained: str  # as recorded in heads: tag, absolute path, hf-hub:ID or none
    checkpoint: Optional[str]  # create_model's `pretrained` argument (tag or path), None for hub/none
    act: str
    act_reason: str

    @property
    def quick_gelu(self) -> bool:
        return self.act == "quickgelu"


def base_arch(arch: str) -> str:
    """`ViT-B-16-quickgelu` -> `ViT-B-16`: the activation is not part of the geometry."""
    return arch[: -len(QUICKGELU_SUFFIX)] if arch.endswith(QUICKGELU_SUFFIX) else arch


def act_name(quick_gelu: bool) -> str:
    return "quickgelu" if quick_gelu else "gelu"


def looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.endswith(WEIGHTS_FILE_SUFFIXES)


# ---- file inspection (no unpickling, no TorchScript) -------------------------------------------
def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A TorchScript zip (what OpenAI's `.pt` downloads are) holds `code/` and `constants.pkl`;
    a torch.save zip holds only `data.pkl` and tensor records."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except OSError:
        return False
    return any("/code/" in f"/{n}" or n.endswith("constants.pkl") for n in names)


def safetensors_metadata(path: str | os.PathLike) -> dict:
    """The `__metadata__` strings of a safetensors file ({} for other files or none)."""
    from .files import read_safetensors_header

    header = read_safetensors_header(path)
    return dict((header or {}).get("__metadata__") or {})


def weights_file_record(path: str | os.PathLike) -> dict:
    """What `clipheads convert` recorded about a weights file ({} when nothing was recorded)."""
    raw = safetensors_metadata(path).get(WEIGHTS_METADATA_KEY)
    if not raw:
        return {}
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return rec if isinstance(rec, dict) else {}


def torchscript_refusal(path: str | os.PathLike) -> BackboneError:
    return BackboneError(
        f"{path} is a TorchScript archive (OpenAI's original .pt format): loading it runs code stored in the "
        "file, so clipheads never loads it implicitly. Convert it once, if you trust where it came from:\n"
        f"  clipheads convert {path} --out {Path(path).with_suffix('.safetensors').name} --trust-torchscript\n"
        "then pass the .safetensors file to --pretrained (it records QuickGELU, as OpenAI's weights need)."
    )


# ---- the activation rule ----------------------------------------------------------------------
def _arch_config(arch: str) -> dict:
    import open_clip

    return open_clip.get_model_config(arch) or {}


def has_quickgelu_weights(arch: str) -> bool:
    """Does open_clip know QuickGELU-trained weights for this geometry (so GELU is a real risk)?"""
    import open_clip

    base = base_arch(arch)
    if base + QUICKGELU_SUFFIX in open_clip.list_models():
        return True
    return any(open_clip.get_pretrained_cfg(base, t).get("quick_gelu", False)
               for t in open_clip.list_pretrained_tags_by_model(base))


def _tag_config(arch: str, tag: str) -> dict:
    """A tag's pretrained config; a `-quickgelu` arch may name a tag of its base arch (whose
    config then says which activation it needs)."""
    import open_clip

    for name in (arch, base_arch(arch)):
        if tag in open_clip.list_pretrained_tags_by_model(name):
            return open_clip.get_pretrained_cfg(name, tag)
    return {}


_ACT_LABEL = {"quickgelu": "QuickGELU", "gelu": "GELU"}


def decide_act(statements: list[ActStatement], default: Optional[str], context: str) -> tuple[str, str]:
    """One activation from the statements (module doc), or a BackboneError that says how to fix it."""
    if len({s.act for s in statements}) > 1:
        lines = "\n".join(f"  {s.source}: {_ACT_LABEL[s.act]}" for s in statements)
        truth = next((s.act for s in statements if s.from_weights), None)
        if truth:
            undo = " and ".join(s.undo for s in statements if not s.from_weights and s.act != truth)
            fix = f"these weights need {_ACT_LABEL[truth]}: {undo}"
        else:
            fix = "choose one: " + ", or ".join(s.undo for s in statements)
        raise BackboneError(f"activation mismatch for {context}:\n{lines}\nRunning weights with an activation they "
                            f"were not trained with gives subtly wrong features everywhere. Fix: {fix}.")
    if statements:
        return statements[0].act, statements[0].source
    if default is None:
        raise BackboneError(
            f"{context}: say which activation these weights were trained with. open_clip builds this "
            "architecture with GELU, but QuickGELU-trained weights exist for it (OpenAI's among them), and a "
            "state-dict file does not record which kind it holds:\n"
            "  OpenAI weights:  --act quickgelu   (or the -quickgelu architecture, e.g. --backbone ViT-B-16-quickgelu)\n"
            "  GELU weights:    --act gelu\n"
            "  an OpenAI .pt:   clipheads convert FILE.pt --out FILE.safetensors --trust-torchscript (records it)"
        )
    return default, "the architecture config's default"


def resolve_weights(arch: str, pretrained: str, act: Optional[str] = None) -> WeightsSource:
    """Turn `--backbone ARCH --pretrained X [--act A]` into a WeightsSource (module doc for the rule).
    Raises BackboneError for unknown archs/tags, missing files, TorchScript archives and any
    activation mismatch; never loads a tensor."""
    import open_clip

    if act is not None and act not in ACTS:
        raise BackboneError(f"--act must be one of {', '.join(ACTS)}, got {act!r}")
    statements: list[ActStatement] = []
    if act:
        statements.append(ActStatement(act, f"--act {act}", f"drop --act {act}"))

    if pretrained.startswith(HF_PREFIX):
        cfg = _hf_config(pretrained)
        statements.append(ActStatement(act_name(bool(cfg.get("quick_gelu", False))),
                                       f"{pretrained}'s open_clip_config.json", "", from_weights=True))
        chosen, reason = decide_act(statements, None, pretrained)
        return WeightsSource("hf-hub", pretrained, pretrained, pretrained, None, chosen, reason)

    if arch not in open_clip.list_models():
        raise BackboneError(f"unknown architecture {arch!r}; see `open_clip.list_models()`")
    config = _arch_config(arch)
    if arch.endswith(QUICKGELU_SUFFIX):
        statements.append(ActStatement("quickgelu", f"the architecture name {arch!r}",
                                       f"use --backbone {base_arch(arch)}"))
    elif config.get("quick_gelu"):
        statements.append(ActStatement("quickgelu", f"{arch}'s model config (quick_gelu: true)",
                                       "use an architecture config without quick_gelu"))
    default = act_name(bool(config.get("quick_gelu", False)))

    if pretrained == NO_WEIGHTS:  # random init: nothing to be faithful to
        chosen, reason = decide_act(statements, default, f"{arch} (random init)")
        return WeightsSource("none", arch, arch, NO_WEIGHTS, None, chosen, reason)

    path = Path(pretrained).expanduser()
    if path.is_file():
        path = path.absolute()
        if is_torchscript_archive(path):
            raise torchscript_refusal(path)
        record = weights_file_record(path)
        if record.get("arch") and base_arch(record["arch"]) != base_arch(arch):
            raise BackboneError(f"{path} holds {record['arch']} weights (recorded by clipheads convert), not {arch}; "
                                f"use --backbone {record['arch']}")
        if record.get("act") in ACTS:
            statements.append(ActStatement(record["act"], f"{path.name}'s metadata ({record.get('act_source', 'clipheads convert')})",
                                           "", from_weights=True))
        ambiguous = default == "gelu" and has_quickgelu_weights(arch)
        chosen, reason = decide_act(statements, None if ambiguous else default, f"{arch} weights {path}")
        return WeightsSource("file", arch, arch, str(path), str(path), chosen, reason)
    if looks_like_path(pretrained):
        raise BackboneError(f"weights file not found: {pretrained}")

    tag_cfg = _tag_config(arch, pretrained)
    if not tag_cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise BackboneError(f"unknown pretrained tag {pretrained!r} for {arch!r}; known tags: {known}")
    quick = bool(tag_cfg.get("quick_gelu", False))
    statements.append(ActStatement(act_name(quick), f"the {pretrained!r} tag's pretrained config (open_clip)",
                                   "", from_weights=True))
    chosen, reason = decide_act(statements, default, f"{arch} --pretrained {pretrained}")
    # build from the arch that lists the tag (a -quickgelu name may point at its base arch's tag)
    model_name = arch if pretrained in open_clip.list_pretrained_tags_by_model(arch) else base_arch(arch)
    return WeightsSource("tag", arch, model_name, pretrained, pretrained, chosen, reason)


def _hf_config(hub_id: str) -> dict:
    import open_clip

    try:
        cfg = open_clip.get_model_config(hub_id)
    except Exception as err:  # noqa: BLE001 - offline, missing repo, bad JSON: all one message
        raise BackboneError(
            f"could not read {hub_id}'s open_clip_config.json ({type(err).__name__}: {err}). Offline, the Hugging "
            "Face cache must hold the repo (copy HF_HOME from a connected machine) and HF_HUB_OFFLINE=1 must be set."
        ) from err
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg:
        raise BackboneError(f"{hub_id}: open_clip_config.json has no model_cfg")
    return cfg
