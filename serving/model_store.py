"""Heads and bundles in BentoML's local model store.

    clipheads models save SOURCE [--name NAME]     # SOURCE: export bundle dir or *.head.safetensors
    clipheads models list                          # our models (`bentoml models list` shows them too)
    clipheads serve NAME[:VERSION]                 # serve from the store by tag

A stored model is a copy of the bundle directory (`<model>/bundle/`) or of the head file
(`<model>/model.head.safetensors`), labelled `framework=clipheads` and `kind=bundle|head`, so it
moves between machines with `bentoml models export/import` and rides along in `bentoml build`.
`BENTOML_HOME` chooses the store (default ~/bentoml).
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from clipheads.training.files import apply_umask

FRAMEWORK = "clipheads"
HEAD_FILE = "model.head.safetensors"
BUNDLE_DIR = "bundle"
HEAD_SUFFIX = ".head.safetensors"


class ModelStoreError(ValueError):
    """A source that is neither a usable path nor a clipheads model in the store."""


def default_name(source: Path) -> str:
    stem = source.name[: -len(HEAD_SUFFIX)] if source.name.endswith(HEAD_SUFFIX) else source.name
    name = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-.") or "head"
    return f"clipheads-{name}"


def _describe(source: Path) -> tuple[str, dict]:
    """Validate `source` the way serving will load it; returns (kind, metadata)."""
    if source.is_dir():
        from .runtimes import RuntimeError_, read_manifest

        try:
            m = read_manifest(source)
        except RuntimeError_ as err:
            raise ModelStoreError(str(err)) from None
        return "bundle", {"tasks": [t["name"] for t in m["tasks"]], "target": m.get("target"),
                          "precision": m.get("precision")}
    if source.is_file() and source.name.endswith(HEAD_SUFFIX):
        from clipheads.training.artifact import ArtifactError, load_head

        try:
            art = load_head(source)
        except ArtifactError as err:
            raise ModelStoreError(str(err)) from None
        return "head", {"method": art.method, "tasks": [t.name for t in art.tasks],
                        "backbone": f"{art.backbone.get('arch')}:{art.backbone.get('pretrained')}"}
    raise ModelStoreError(f"{source}: not an export bundle directory or a *{HEAD_SUFFIX} file")


def save(source: str | Path, name: Optional[str] = None) -> str:
    """Copy a bundle or head into the local store; returns the new tag ("name:version")."""
    import bentoml

    src = Path(source).expanduser().resolve()
    kind, meta = _describe(src)
    with bentoml.models.create(name or default_name(src), labels={"framework": FRAMEWORK, "kind": kind},
                               metadata=meta) as model:
        dest = Path(model.path)
        # plain copies (new files get the umask's mode), not the source's modes: a head written
        # 0600 by an older clipheads must still be readable by the Bento's container user
        if kind == "bundle":
            shutil.copytree(src, dest / BUNDLE_DIR, copy_function=shutil.copyfile)
            for d in [dest / BUNDLE_DIR, *(p for p in (dest / BUNDLE_DIR).rglob("*") if p.is_dir())]:
                apply_umask(d, is_dir=True)
        else:
            shutil.copyfile(src, dest / HEAD_FILE)
    return str(model.tag)


def resolve_source(ref: str | Path) -> Path:
    """An existing path is returned as is; otherwise `ref` is a model tag in the local store."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(str(ref))
    except (BentoMLException, ValueError) as err:
        raise ModelStoreError(f"{ref}: no such file, and not a model in the BentoML store ({err})") from None
    if model.info.labels.get("framework") != FRAMEWORK:
        raise ModelStoreError(f"{model.tag} is not a clipheads model (labels {model.info.labels})")
    root = Path(model.path)
    for candidate in (root / BUNDLE_DIR, root / HEAD_FILE):
        if candidate.exists():
            return candidate
    raise ModelStoreError(f"{model.tag}: the stored model holds neither {BUNDLE_DIR}/ nor {HEAD_FILE}")


def list_models() -> list[dict]:
    import bentoml

    rows = []
    for m in bentoml.models.list():
        if m.info.labels.get("framework") == FRAMEWORK:
            rows.append({"tag": str(m.tag), "kind": m.info.labels.get("kind"), "created": str(m.info.creation_time)[:19],
                         **{k: v for k, v in m.info.metadata.items() if k in ("tasks", "method", "precision")}})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="clipheads models", description="clipheads heads/bundles in BentoML's model store")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("save", help="copy a bundle or head into the local model store")
    s.add_argument("source")
    s.add_argument("--name", default=None, help="model name (default: clipheads-<file or folder name>)")
    sub.add_parser("list", help="list clipheads models in the store")
    args = p.parse_args(argv)
    try:
        if args.what == "save":
            print(save(args.source, args.name))
            return 0
        for row in list_models():
            extra = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("tag", "kind", "created"))
            print(f"{row['tag']:<48} {row['kind']:<7} {row['created']}  {extra}")
        return 0
    except ModelStoreError as err:
        print(f"clipheads models: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
