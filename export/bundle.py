"""The export bundle on disk: a directory with `manifest.json` and the files it lists (BUNDLE.md).

Writing is atomic (everything goes to a temporary sibling directory that is renamed into place),
so a reader never sees half a bundle. Reading validates the format version, refuses file names
that could leave the directory, and checks the sha256 of every listed file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from clipheads.training.files import apply_umask, file_sha256

FORMAT = "clipheads-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """Not a readable clipheads bundle (format, version, missing or tampered files)."""


def safe_name(name: str) -> str:
    """A plain file name inside the bundle; anything that could escape it is refused."""
    if (
        not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
        or "/" in name or "\\" in name or "\x00" in name or Path(name).name != name or Path(name).is_absolute()
    ):
        raise BundleError(f"bundle file name {name!r} is not a plain file name (path traversal refused)")
    return name


def _describe(path: Path) -> dict:
    entry: dict = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    if path.suffix == ".onnx":
        from .onnx_export import graph_io

        entry.update(graph_io(path))
    return entry


def check_writable(out: str | os.PathLike) -> Path:
    """`out` as an absolute path, if a bundle may be written there: nothing, an empty directory or a
    bundle (replaced). Anything else is refused: exporters call this before any work, so a wrong
    `--out` fails at once rather than after the export."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise BundleError(f"{out} exists and is not a clipheads bundle; refusing to overwrite it")
    above = next(p for p in out.parents if p.exists())  # "/" at the latest
    if not above.is_dir():
        raise BundleError(f"cannot write a bundle at {out}: {above} is not a directory")
    try:  # a real write: permission bits do not tell a read-only mount or /proc
        os.rmdir(tempfile.mkdtemp(prefix=".clipheads-write-check.", dir=above))
    except OSError as err:
        raise BundleError(f"cannot write a bundle at {out}: {above} is not writable ({err.strerror or err})") from None
    return out


def write_bundle(out: str | os.PathLike, manifest: Mapping, files: Mapping[str, str | os.PathLike],
                 graph_meta: Optional[Mapping[str, dict]] = None) -> Path:
    """Copy `files` ({name in bundle: source path}) and write the manifest with their sha256 and
    ONNX input/output signatures under "graphs". Replaces an existing bundle at `out` atomically;
    refuses to replace a directory that is not a bundle."""
    out = check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    apply_umask(tmp, is_dir=True)  # mkdtemp creates 0700; the bundle is published with the umask's mode
    try:
        graphs = {}
        for name, src in files.items():
            safe_name(name)
            shutil.copyfile(src, tmp / name)
            graphs[name] = {**(graph_meta or {}).get(name, {}), **_describe(tmp / name)}
        m = dict(manifest)
        m["format"], m["format_version"] = FORMAT, FORMAT_VERSION
        m["graphs"] = graphs
        (tmp / MANIFEST).write_text(json.dumps(m, indent=1, sort_keys=False))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # disk full, permissions changed meanwhile: a clear error, not a traceback
            raise BundleError(f"writing the bundle at {out} failed: {err}") from err
        raise
    return out


def update_manifest(root: str | os.PathLike, manifest: Mapping) -> None:
    """Rewrite manifest.json in place atomically (temp file + rename); used when adding engines."""
    root = Path(root)
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(dict(manifest), indent=1))
    os.replace(tmp, root / MANIFEST)


def add_file(root: str | os.PathLike, manifest: dict, name: str, src: str | os.PathLike, **meta) -> dict:
    """Move a new file (e.g. a TensorRT engine) into the bundle and list it; returns the manifest."""
    root = Path(root)
    safe_name(name)
    tmp = root / f".{name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, root / name)
    manifest = dict(manifest)
    manifest["graphs"] = {**manifest.get("graphs", {}), name: {**meta, **_describe(root / name)}}
    update_manifest(root, manifest)
    return manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    def path(self, name: str) -> Path:
        return self.root / safe_name(name)

    @property
    def tasks(self) -> list[dict]:
        return list(self.manifest["tasks"])

    def image_graphs(self) -> list[str]:
        return sorted({t["graph"] for t in self.manifest["tasks"]})

    @property
    def text_graph(self) -> Optional[str]:
        return (self.manifest.get("text") or {}).get("graph")


def load_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and validate a bundle. `verify`: check every listed file's sha256 (on by default)."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: not a clipheads bundle (no {MANIFEST})")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{mpath}: unreadable manifest ({err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format {m.get('format') if isinstance(m, dict) else None!r} is not {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format_version {m.get('format_version')!r} is not supported (this clipheads reads "
            f"{FORMAT_VERSION}); re-export the bundle with this version"
        )
    for key in ("preprocess", "tasks", "graphs", "backbone"):
        if key not in m:
            raise BundleError(f"{mpath}: manifest has no {key!r}")
    graphs = m["graphs"]
    for name, entry in graphs.items():
        safe_name(name)
        path = root / name
        if not path.is_file():
            raise BundleError(f"{root}: {name} is listed in the manifest but missing")
        if verify:
            want = entry.get("sha256")
            if not want:
                raise BundleError(f"{mpath}: {name} has no sha256")
            got = file_sha256(path)
            if got != want:
                raise BundleError(
                    f"{root}: {name} does not match its manifest sha256 (file {got[:12]}…, manifest {want[:12]}…): "
                    "the bundle was modified or corrupted; re-export it"
                )
    seen = set()
    for t in m["tasks"]:
        g = t.get("graph")
        safe_name(g)
        if g not in graphs:
            raise BundleError(f"{mpath}: task {t.get('name')!r} uses graph {g!r}, which the manifest does not list")
        a, b = t.get("logit_slice", (None, None))
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b):
            raise BundleError(f"{mpath}: task {t.get('name')!r} has a bad logit_slice {t.get('logit_slice')!r}")
        if t["name"] in seen:
            raise BundleError(f"{mpath}: task name {t['name']!r} appears twice")
        seen.add(t["name"])
    text = m.get("text") or {}
    if text.get("graph"):
        safe_name(text["graph"])
        if text["graph"] not in graphs:
            raise BundleError(f"{mpath}: text graph {text['graph']!r} is not listed under graphs")
    return Bundle(root, m)
