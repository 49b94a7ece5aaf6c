"""The head artifact: one `NAME.head.safetensors` file, tensors + JSON metadata (DESIGN.md).

Loading never executes code from the file: safetensors parses a JSON header and raw buffers.
Everything the file claims is validated against the method it names before a tensor is used.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor

from . import __version__
from .files import apply_umask
from .backbone import Backbone, PreprocessSpec
from .backbone_record import open_head_backbone, record_differences
from .methods.base import HeadMethod, MethodError, TaskSpec, build_method

from .head_header import FORMAT_VERSION, METADATA_KEY, SUFFIX, ArtifactError, read_head_header  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class HeadArtifact:
    method: str
    method_config: dict
    backbone: dict  # the backbone record: {arch, pretrained, weights_sha256, act, ...} (backbone_record.py)
    tasks: tuple[TaskSpec, ...]
    preprocess: PreprocessSpec
    training: dict
    tensors: dict[str, Tensor] = field(repr=False)
    package_version: str = __version__
    format_version: int = FORMAT_VERSION

    def metadata(self) -> dict:
        return {
            "format_version": self.format_version,
            "method": {"name": self.method, "config": self.method_config},
            "backbone": self.backbone,
            "tasks": [t.to_json() for t in self.tasks],
            "preprocess": self.preprocess.to_json(),
            "training": self.training,
            "package_version": self.package_version,
        }

    def open_backbone(self, weights_override: Optional[str] = None, device: str = "cpu",
                      log: Optional[Callable[[str], None]] = None) -> Backbone:
        """The recorded backbone; `weights_override` = where its weights are now (sha256-checked)."""
        return open_head_backbone(self.backbone, weights_override, device=device, log=log)

    def build(self, backbone: Optional[Backbone] = None, device: str = "cpu",
              weights_override: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> HeadMethod:
        """Instantiate the method on `backbone` (opened from the record if None, see `open_backbone`)
        and load the tensors strictly: a missing, extra or mis-shaped tensor is an ArtifactError."""
        if backbone is None:
            backbone = self.open_backbone(weights_override, device=device, log=log)
        check_backbone_matches(self, backbone)
        try:
            head = build_method(self.method, backbone, self.tasks, self.method_config)
        except MethodError as err:
            raise ArtifactError(f"head config rejected: {err}") from err
        expected = head.state_dict()
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        bad = sorted(k for k in set(expected) & set(self.tensors) if expected[k].shape != self.tensors[k].shape)
        if missing or extra or bad:
            detail = "; ".join(
                s for s in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {extra}" if extra else "",
                    "shape mismatch " + ", ".join(f"{k}: file {tuple(self.tensors[k].shape)} vs method {tuple(expected[k].shape)}" for k in bad) if bad else "",
                ) if s
            )
            raise ArtifactError(f"tensors do not match method {self.method!r} on {backbone.arch}: {detail}")
        head.load_state_dict(self.tensors, strict=True)
        head.training_record = dict(self.training)  # what fit.evaluate checks (held-out splits, data)
        return head.to(device)


def check_backbone_matches(artifact: HeadArtifact, backbone: Backbone) -> None:
    """ArtifactError when `backbone` runs a different forward than the head was trained on."""
    diffs = record_differences(artifact.backbone, backbone.record())
    if diffs:
        want = artifact.backbone
        raise ArtifactError(
            f"this head was trained for backbone {want.get('arch')!r} ({want.get('pretrained')}), not "
            f"{backbone.arch!r} ({backbone.pretrained}): {'; '.join(diffs)}"
        )


def make_artifact(head: HeadMethod, training: Optional[dict] = None) -> HeadArtifact:
    bb = head.backbone
    return HeadArtifact(
        method=head.name,
        method_config=head.config.to_dict(),
        backbone=bb.record(),
        tasks=head.tasks,
        preprocess=bb.preprocess,
        training=dict(training if training is not None else getattr(head, "training_record", None) or {}),
        tensors=head.head_tensors(),
    )


def save_head(head_or_artifact: HeadMethod | HeadArtifact, path: str | Path, training: Optional[dict] = None) -> Path:
    """Write a head (or artifact) to `path` (NAME.head.safetensors) atomically; returns the path.
    `training` defaults to the record `train` attached to the head (data, held-out splits, metrics).

    Example:
        >>> clipheads.save_head(head, "pets.head.safetensors")  # doctest: +SKIP
        PosixPath('pets.head.safetensors')
    """
    from safetensors.torch import save_file

    art = head_or_artifact if isinstance(head_or_artifact, HeadArtifact) else make_artifact(head_or_artifact, training)
    path = check_head_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.contiguous() for k, v in art.tensors.items()}
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(art.metadata(), sort_keys=True)})
    apply_umask(tmp)  # safetensors creates 0600
    tmp.replace(path)  # atomic: a crash never leaves a half-written head
    return path


def check_head_path(path: str | Path) -> Path:
    """`path` if a head can be written there (name, not a folder, a writable parent): checked
    before training, so a long run never ends in a refusal to save."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise ArtifactError(f"head files are named NAME{SUFFIX}, got {path.name!r}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; give a file name NAME{SUFFIX}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {path}: {parent} is not a writable folder")
    return path


def load_head(path: str | Path) -> HeadArtifact:
    """Read and validate a head file (header, metadata, dtypes and size first, `read_head_header`,
    then the tensors). Never unpickles; raises ArtifactError with a reason."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_head_header(path)
    path, meta = header.path, header.meta
    try:
        tensors = load_file(str(path))
        art = HeadArtifact(
            method=header.method,
            method_config=header.method_config,
            backbone=header.backbone,
            tasks=tuple(TaskSpec.from_json(t) for t in meta["tasks"]),
            preprocess=PreprocessSpec.from_json(meta["preprocess"]),
            training=dict(meta.get("training") or {}),
            tensors=tensors,
            package_version=str(meta.get("package_version", "?")),
            format_version=meta["format_version"],
        )
    except SafetensorError as err:
        raise ArtifactError(f"{path}: corrupt tensor data: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: incomplete head metadata ({type(err).__name__}: {err})") from None
    return art  # fp32 and whole: read_head_header checked both from the header


def describe(art: HeadArtifact) -> dict[str, Any]:
    """A short human/JSON summary for `clipheads info`."""
    n = sum(t.numel() for t in art.tensors.values())
    return {
        "method": art.method,
        "config": art.method_config,
        "backbone": art.backbone,
        "tasks": [{"name": t.name, "classes": len(t.classnames), "group": t.group} for t in art.tasks],
        "tensors": {k: list(v.shape) for k, v in art.tensors.items()},
        "stored_values": n,
        "preprocess": art.preprocess.to_json(),
        "training": art.training,
        "format_version": art.format_version,
        "package_version": art.package_version,
    }
