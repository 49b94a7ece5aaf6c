"""The backbone record every head and bundle carries, and reopening a head's backbone from it.

A record names what defines the frozen backbone's forward: the architecture, the activation
(QuickGELU vs GELU), the input geometry, a hash of the tensor layout, and the sha256 of the
weights file. Opening a head rebuilds exactly that backbone, optionally from weights that moved
(`--pretrained NEWPATH`, checked against the recorded sha256), and refuses anything else.

Heads written before the record gained its forward fields (only arch/pretrained/sha) were built
with open_clip's default activation; they are read with that activation, so a head trained on
GELU-run OpenAI weights is refused with the reason instead of being silently "fixed".
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from .backbone_source import ACTS, NO_WEIGHTS, BackboneError, base_arch, looks_like_path
from .files import file_sha256

if TYPE_CHECKING:
    from .backbone import Backbone

# Fields that must agree between a record and the backbone a head runs on (when both have them).
FORWARD_FIELDS = ("act", "image_size", "context_length", "embed_dim", "text_pool", "vision_pool", "structure_sha256")
_ACT_LABEL = {"quickgelu": "QuickGELU", "gelu": "GELU"}


def structure_sha256(backbone: "Backbone") -> str:
    """sha256 over every tensor's name, shape and dtype (not the values): the layer layout."""
    h = hashlib.sha256()
    for name, t in sorted(backbone.model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def backbone_record(backbone: "Backbone") -> dict:
    import open_clip

    visual = backbone.model.visual
    return {
        "arch": backbone.arch,
        "pretrained": backbone.pretrained,
        "weights_sha256": backbone.weights_sha256,
        "act": backbone.act,
        "image_size": backbone.preprocess.image_size,
        "context_length": backbone.context_length,
        "embed_dim": backbone.embed_dim,
        "text_pool": str(getattr(backbone._text, "pool_type", "") or ""),
        "vision_pool": str(getattr(visual, "pool_type", type(visual).__name__)),
        "precision": "fp32",
        "structure_sha256": structure_sha256(backbone),
        "open_clip": open_clip.__version__,  # informational: not compared
    }


def recorded_act(record: Mapping) -> str:
    """The record's activation; for a legacy record (no `act`), what open_clip built by default."""
    if record.get("act") in ACTS:
        return str(record["act"])
    import open_clip

    from .backbone import register_packaged_configs

    register_packaged_configs()
    arch = str(record.get("arch") or "")
    cfg = open_clip.get_model_config(arch) if not arch.startswith("hf-hub:") else None
    return "quickgelu" if (arch.endswith("-quickgelu") or (cfg or {}).get("quick_gelu")) else "gelu"


def record_differences(recorded: Mapping, actual: Mapping) -> list[str]:
    """Human-readable differences that make `actual` a different forward than `recorded`."""
    diffs = []
    if base_arch(str(recorded.get("arch"))) != base_arch(str(actual.get("arch"))):
        diffs.append(f"architecture {recorded.get('arch')} vs {actual.get('arch')}")
    want_act, got_act = recorded_act(recorded), actual.get("act")
    if got_act and want_act != got_act:
        diffs.append(f"activation {_ACT_LABEL.get(want_act, want_act)} vs {_ACT_LABEL.get(got_act, got_act)}")
    for key in FORWARD_FIELDS[1:]:
        a, b = recorded.get(key), actual.get(key)
        if a is not None and b is not None and a != b:
            diffs.append(f"{key} {str(a)[:16]} vs {str(b)[:16]}")
    a, b = recorded.get("weights_sha256"), actual.get("weights_sha256")
    if a and b and a != b:
        diffs.append(f"weights sha256 {a[:12]}… vs {b[:12]}…")
    return diffs


def _legacy_note(record: Mapping, err: BackboneError) -> BackboneError:
    return BackboneError(
        f"this head was written by an older clipheads that ran {record.get('arch')} / {record.get('pretrained')} "
        f"with {_ACT_LABEL[recorded_act(record)]}, which these weights were not trained with, so its prompts or "
        f"adapters were learned on a mis-activated backbone. Retrain the head with this version.\n({err})"
    )


def check_weights_override(record: Mapping, weights_override: Optional[str] = None) -> str:
    """Where a head's backbone weights will be read (the override, else the recorded source), after
    the checks that need no model: a recorded file that moved, random weights for a trained head,
    a local override whose sha256 differs from the recorded one. BackboneError says what to do."""
    recorded = str(record.get("pretrained") or "")
    source = weights_override or recorded
    if not weights_override and looks_like_path(recorded) and not Path(recorded).expanduser().is_file():
        sha = record.get("weights_sha256")
        raise BackboneError(
            f"this head was trained on the weights file {recorded}, which is not there any more; pass the file's "
            f"new location with --pretrained NEWPATH" + (f" (its sha256 must be {sha})" if sha else "")
        )
    if weights_override and source == NO_WEIGHTS and recorded != NO_WEIGHTS:
        raise BackboneError(f"--pretrained none gives random weights; this head was trained on {recorded}")
    sha = record.get("weights_sha256")
    if weights_override and sha and Path(source).expanduser().is_file():  # refuse before building the model
        got = file_sha256(Path(source).expanduser())
        if got != sha:
            raise BackboneError(f"{source} is not the weights this head was trained on: sha256 {got[:12]}…, the head "
                                f"records {sha[:12]}… ({recorded}). Pass the original weights file.")
    return source


def open_head_backbone(record: Mapping, weights_override: Optional[str] = None, device: str = "cpu",
                       log: Optional[Callable[[str], None]] = None) -> "Backbone":
    """The backbone a head (or bundle) was made on, from its record. `weights_override`: where the
    weights are now (path, tag or hf-hub id); its sha256 must equal the recorded one. The
    architecture and activation always come from the record. `log` gets one line naming the file."""
    from .backbone import load_backbone

    arch = str(record.get("arch"))
    source = check_weights_override(record, weights_override)
    legacy = record.get("act") not in ACTS
    try:
        bb = load_backbone(arch, source, device=device, act=recorded_act(record))
    except BackboneError as err:
        if legacy and "activation mismatch" in str(err):
            raise _legacy_note(record, err) from err
        raise
    check_record(record, bb, "this head")
    if weights_override and not record.get("weights_sha256") and log:
        log(f"note: the head records no weights sha256, so {source} could not be verified against it")
    if log:
        log(f"backbone: {bb.describe_weights()}")
    return bb


def check_record(record: Mapping, backbone: "Backbone", what: str = "this head") -> None:
    """BackboneError when `backbone` is not the forward `record` describes."""
    diffs = record_differences(record, backbone.record())
    if diffs:
        sha = record.get("weights_sha256")
        hint = (f" Pass the original weights with --pretrained PATH (sha256 {sha[:12]}…)." if sha and any(
            d.startswith("weights") for d in diffs) else "")
        raise BackboneError(f"{what} was made on a different backbone than the one loaded ({'; '.join(diffs)}): "
                            f"recorded {record.get('arch')} / {record.get('pretrained')}, loaded "
                            f"{backbone.arch} / {backbone.pretrained}.{hint}")
