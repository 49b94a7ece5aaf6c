"""`clipheads convert`: a CLIP checkpoint (OpenAI TorchScript `.pt`, a pickled or safetensors state
dict) -> one fp32 open_clip safetensors file that records its architecture and activation.

OpenAI's downloads (ViT-B-16.pt, RN50.pt, ...: what CoOp/MaPLe/MMA/COMMA users have on disk) are
TorchScript archives; deserialising one runs TorchScript code stored in the file, so it happens
only here, once, behind an explicit `trust_torchscript=True`. The output is plain tensors plus
JSON metadata, which `--pretrained FILE` then loads without asking for `--act` again.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .backbone_source import ACTS, WEIGHTS_METADATA_KEY, BackboneError, base_arch, is_torchscript_archive
from .files import apply_umask, file_sha256, read_safetensors_header

# Integer attributes OpenAI's archives keep beside the tensors; not weights.
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
OPENAI_ACT_SOURCE = "OpenAI TorchScript archive (OpenAI's CLIP runs QuickGELU)"


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    arch: Optional[str]
    act: Optional[str]
    act_source: str
    tensors: int
    source_sha256: str
    sha256: str

    def to_json(self) -> dict:
        return {"out": str(self.out), "arch": self.arch, "act": self.act, "act_source": self.act_source,
                "tensors": self.tensors, "source_sha256": self.source_sha256, "sha256": self.sha256}


def _read_state_dict(src: Path, trust_torchscript: bool) -> tuple[dict, bool]:
    """-> (state dict, came from a TorchScript archive)."""
    if is_torchscript_archive(src):
        if not trust_torchscript:
            raise BackboneError(
                f"{src} is a TorchScript archive: reading it runs code stored in the file. If you trust its origin "
                "(e.g. OpenAI's own download), rerun with --trust-torchscript; the output is plain safetensors."
            )
        return dict(torch.jit.load(str(src), map_location="cpu").state_dict()), True
    if read_safetensors_header(src) is not None:
        from safetensors.torch import load_file

        return load_file(str(src)), False
    try:  # a pickled state dict: tensors only, never arbitrary objects
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is one clear error
        raise BackboneError(f"{src}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{src}: not a state dict of tensors")
    return dict(obj), False


def _clean(sd: dict) -> dict:
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if k not in _OPENAI_SCALARS}
    # fp16 archives -> fp32 (exact); the model runs in fp32
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _geometry(sd: dict) -> Optional[dict]:
    """The open_clip-config fields an OpenAI-layout state dict implies (None: not that layout)."""
    try:
        g = {"embed_dim": sd["text_projection"].shape[1], "context_length": sd["positional_embedding"].shape[0],
             "vocab_size": sd["token_embedding.weight"].shape[0], "text_width": sd["ln_final.weight"].shape[0],
             "text_layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})}
        if "visual.proj" in sd:
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            g.update(vision_width=sd["visual.conv1.weight"].shape[0], patch_size=patch, image_size=patch * grid,
                     vision_layers=len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}))
        else:
            g.update(vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], patch_size=None,
                     image_size=32 * round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5),
                     vision_layers=[len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                                    for b in (1, 2, 3, 4)])
    except (KeyError, IndexError):
        return None
    return g


def _config_geometry(cfg: dict) -> dict:
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    layers = v.get("layers")
    return {"embed_dim": cfg.get("embed_dim"), "context_length": t.get("context_length", 77),
            "vocab_size": t.get("vocab_size", 49408), "text_width": t.get("width", 512), "text_layers": t.get("layers", 12),
            "vision_width": v.get("width"), "patch_size": v.get("patch_size"), "image_size": v.get("image_size"),
            "vision_layers": list(layers) if isinstance(layers, (list, tuple)) else layers}


def infer_arch(sd: dict) -> Optional[str]:
    """The open_clip architecture (without -quickgelu) whose config matches the state dict's geometry."""
    import open_clip

    g = _geometry(sd)
    if g is None:
        return None
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        if name.endswith("-quickgelu") or "timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {}):
            continue
        if _config_geometry(cfg) == g:
            return name
    return None


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, trust_torchscript: bool = False,
                       arch: Optional[str] = None, act: Optional[str] = None) -> ConvertResult:
    """Convert `src` to an fp32 safetensors file at `out` (module doc). `act` is required unless
    the source is an OpenAI TorchScript archive (QuickGELU); `arch` is inferred when omitted."""
    from safetensors.torch import save_file

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise BackboneError(f"no such checkpoint: {src}")
    if out.suffix != ".safetensors":
        raise BackboneError(f"--out must end in .safetensors, got {out.name}")
    if act is not None and act not in ACTS:
        raise BackboneError(f"--act must be one of {', '.join(ACTS)}, got {act!r}")
    sd, scripted = _read_state_dict(src, trust_torchscript)
    sd = _clean(sd)
    found = infer_arch(sd)
    if arch and found and base_arch(arch) != found:
        raise BackboneError(f"{src} has the geometry of {found}, not {arch}")
    arch = base_arch(arch) if arch else found
    act_source = f"--act {act}" if act else (OPENAI_ACT_SOURCE if scripted else "not stated")
    act = act or ("quickgelu" if scripted else None)
    record = {"format": "open_clip state dict", "arch": arch, "act": act, "act_source": act_source,
              "source": src.name, "source_sha256": file_sha256(src)}
    record = {k: v for k, v in record.items() if v is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata={WEIGHTS_METADATA_KEY: json.dumps(record, sort_keys=True)})
    apply_umask(tmp)  # safetensors creates 0600
    tmp.replace(out)
    return ConvertResult(out.absolute(), arch, act, act_source, len(sd), record["source_sha256"], file_sha256(out))
