"""The layout of one clipheads entry in BentoML's model store (written by model_store.py), read
without BentoML: runtimes look here for a stored head's backbone weights.

    <entry>/model.head.safetensors   a head            <entry>/bundle/   an export bundle
    <entry>/backbone/<file>          the head's backbone weights, when stored
    <entry>/backbone.json            {file, sha256, bytes, pretrained} of those weights
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

HEAD_FILE = "model.head.safetensors"
BUNDLE_DIR = "bundle"
WEIGHTS_DIR = "backbone"
WEIGHTS_RECORD = "backbone.json"


def stored_weights(source: str | Path) -> Optional[str]:
    """The backbone weights file a stored head's entry holds (None for anything else): runtimes
    opened on `<entry>/model.head.safetensors` use it instead of the head's recorded path."""
    src = Path(source)
    if src.name != HEAD_FILE:
        return None
    rec_path = src.parent / WEIGHTS_RECORD
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
        rel = Path(str(rec["file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rel.is_absolute() or ".." in rel.parts:  # a record that escapes its entry is ignored
        return None
    path = src.parent / rel
    return str(path) if path.is_file() else None
