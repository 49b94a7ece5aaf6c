"""What runtimes read from a bundle or head without running anything: the manifest, the task
layout, fingerprints."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from clipheads.training.files import file_sha256

from .base import RuntimeError_, TaskInfo

BUNDLE_FORMAT = "clipheads-bundle"
BUNDLE_FORMAT_VERSION = 1


def source_sha256(source: str | os.PathLike) -> str:
    """The content fingerprint of a bundle (its manifest.json, which holds the sha256 of every
    graph) or of a head file."""
    src = Path(source)
    return file_sha256(src / "manifest.json" if src.is_dir() else src)


def backbone_identity(backbone: dict) -> str:
    """arch:pretrained:weights-sha prefix, from a head's or manifest's `backbone` entry: few-shot
    tasks are persisted under it, and a head swap must keep it."""
    sha = str(backbone.get("weights_sha256") or "")
    return f"{backbone.get('arch')}:{backbone.get('pretrained')}:{sha[:16]}"


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Read and validate a bundle's manifest.json (the contract in DESIGN.md / issue 7)."""
    root = Path(bundle)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise RuntimeError_(f"{root}: not a clipheads bundle (no manifest.json)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError_(f"{mpath}: unreadable manifest ({err})") from None
    if m.get("format") != BUNDLE_FORMAT:
        raise RuntimeError_(f"{mpath}: format {m.get('format')!r} is not {BUNDLE_FORMAT!r}")
    if m.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise RuntimeError_(
            f"{mpath}: bundle format_version {m.get('format_version')!r} is not supported "
            f"(this clipheads serves {BUNDLE_FORMAT_VERSION}); re-export the bundle"
        )
    for key in ("preprocess", "tasks", "graphs"):
        if key not in m:
            raise RuntimeError_(f"{mpath}: manifest has no {key!r}")
    for f in m["graphs"]:
        if not isinstance(f, str) or Path(f).name != f or f in (".", ".."):
            raise RuntimeError_(f"{mpath}: graph file name {f!r} must be a plain file name")
    # every graph a task or the text side runs must be one `graphs` lists (and so sha256-checked):
    # "../elsewhere.onnx" or "./image_0.onnx" would load an unverified file, maybe outside the bundle
    used = [t.get("graph") for t in m["tasks"] if isinstance(t, dict)] + [(m.get("text") or {}).get("graph")]
    if len(used) - 1 != len(m["tasks"]):
        raise RuntimeError_(f"{mpath}: every task must be an object")
    unlisted = sorted({str(g) for g in used if g is not None and g not in m["graphs"]})
    if unlisted:
        raise RuntimeError_(f"{mpath}: graph(s) {', '.join(unlisted)} are not listed in the manifest's graphs")
    return m


def zero_shot_path(path_keys: Sequence[tuple[str, int]], image_graph: Optional[str]) -> int:
    """The image path whose features zero-shot labels and few-shot tasks are scored on: the plain
    image graph (`text.image_graph`, BUNDLE.md), which shares the text tower's space; a bundle
    without one (every task has its own visual prompts or adapters) uses its first task's path, the
    head's own image tower. Every runtime follows this rule, so a head answers alike on each."""
    key = (image_graph, 0)
    return path_keys.index(key) if image_graph and key in path_keys else 0


def index_tasks(tasks: Sequence[dict]) -> tuple[list[tuple[str, int]], dict[str, TaskInfo]]:
    """Manifest-style task entries ({name, classnames, graph, task_index, logit_slice, templates})
    -> the distinct image paths (graph, task_index) in first-use order, and each task's TaskInfo."""
    keys: list[tuple[str, int]] = []
    infos: dict[str, TaskInfo] = {}
    for t in tasks:
        key = (t["graph"], int(t.get("task_index", 0)))
        if key not in keys:
            keys.append(key)
        a, b = t["logit_slice"]
        infos[t["name"]] = TaskInfo(t["name"], tuple(t["classnames"]), keys.index(key), (int(a), int(b)),
                                    tuple(t.get("templates") or ("a photo of a {}.",)))
    return keys, infos
