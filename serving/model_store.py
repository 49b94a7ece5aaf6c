"""Heads and bundles in BentoML's local model store.

    clipheads models save SOURCE [--name NAME] [--with-weights|--no-weights] [--pretrained FILE]
    clipheads models list                          # our models (`bentoml models list` shows them too)
    clipheads models bentofile TAG [--out FILE]    # a bentofile whose Bento carries TAG (`make bento MODEL=TAG`)
    clipheads serve NAME[:VERSION]                 # serve from the store by tag

A stored model is a copy of the bundle directory (`<model>/bundle/`) or of the head file
(`<model>/model.head.safetensors`), labelled `framework=clipheads` and `kind=bundle|head`, so it
moves between machines with `bentoml models export/import` and rides along in `bentoml build`.
A head's backbone weights can travel in the entry too (`<model>/backbone/<file>` + `backbone.json`
with its sha256; `<file>` ends in `.safetensors` exactly when the content is safetensors, as open_clip
picks its loader by the name): by default when the head was trained on a local weights file (the head only
records its absolute path), with `--with-weights` for a downloadable tag (read from the local
open_clip / Hugging Face cache); otherwise `save` warns what the serving machine will need. Every
runtime opened on a stored head uses stored weights (`stored_weights`), sha256-checked.
`BENTOML_HOME` chooses the store (default ~/bentoml).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from clipheads.training import console
from clipheads.training.files import apply_umask

from .model_entry import BUNDLE_DIR, HEAD_FILE, WEIGHTS_DIR, WEIGHTS_RECORD, stored_weights  # noqa: F401 (re-exported)

FRAMEWORK = "clipheads"
HEAD_SUFFIX = ".head.safetensors"


class ModelStoreError(ValueError):
    """Bad input for the store (exit 2, one line): a source that is neither a usable path nor a
    clipheads model in the store, a name BentoML refuses or that is taken, weights that are gone."""


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
        from clipheads.training.head_header import ArtifactError, read_head_header

        try:
            head = read_head_header(source)  # the header only: no torch import in `models save`
        except ArtifactError as err:
            raise ModelStoreError(str(err)) from None
        return "head", {"method": head.method, "tasks": head.task_names,
                        "backbone": f"{head.backbone.get('arch')}:{head.backbone.get('pretrained')}"}
    raise ModelStoreError(f"{source}: not an export bundle directory or a *{HEAD_SUFFIX} file")


@dataclass
class SaveResult:
    tag: str
    kind: str
    weights: Optional[dict] = None  # {file, sha256, bytes, pretrained} when the entry holds the backbone weights
    warnings: list[str] = field(default_factory=list)


def weights_kind(pretrained: str) -> str:
    """How a head's recorded `pretrained` is found again: `packaged` (ships with clipheads),
    `none` (random init), `file` (a local path: only this machine has it), `hf-hub` or `tag`
    (downloadable, given network or a filled Hugging Face cache)."""
    from clipheads.training.backbone_source import HF_PREFIX, NO_WEIGHTS, PACKAGED_TAG, looks_like_path

    if pretrained == PACKAGED_TAG:
        return "packaged"
    if pretrained == NO_WEIGHTS or not pretrained:
        return "none"
    if pretrained.startswith(HF_PREFIX):
        return "hf-hub"
    return "file" if looks_like_path(pretrained) else "tag"


def _cached_tag_file(arch: str, tag: str) -> Path:
    """The local file of an open_clip tag's weights (the Hugging Face / open_clip cache; offline)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or open_clip.get_pretrained_cfg(arch.removesuffix("-quickgelu"), tag)
    try:
        path = open_clip.download_pretrained(cfg) if cfg else ""
    except Exception as err:  # noqa: BLE001 - offline cache miss, hub errors: one reason
        raise ModelStoreError(f"the weights of {arch} --pretrained {tag} are not in the local cache ({type(err).__name__}); "
                              "pass the file with --pretrained FILE") from None
    if not path:
        raise ModelStoreError(f"no local file for {arch} --pretrained {tag}; pass it with --pretrained FILE")
    return Path(path)


def _weights_to_store(record: dict, with_weights: Optional[bool], pretrained: Optional[str]) -> tuple[Optional[Path], list[str]]:
    """(the file to copy into the entry or None, warnings). `with_weights` None: the default
    (store when the head records a local file)."""
    from clipheads.training.backbone_record import check_weights_override
    from clipheads.training.backbone_source import BackboneError

    recorded = str(record.get("pretrained") or "")
    kind = weights_kind(recorded)
    if with_weights is False and pretrained is not None:
        raise ModelStoreError("--pretrained names weights to store in the entry; it cannot go with --no-weights")
    store = (kind == "file" or pretrained is not None) if with_weights is None else with_weights
    if kind in ("packaged", "none"):
        if with_weights or pretrained:
            raise ModelStoreError(f"this head's backbone is {recorded!r}: there are no weights to store")
        return None, []
    if not store:
        if kind == "file" and not Path(recorded).expanduser().is_file():
            raise ModelStoreError(f"this head's recorded backbone weights {recorded} are gone (moved or deleted) and "
                                  "--no-weights stores none: the entry could not be served anywhere; pass the weights "
                                  "with --pretrained FILE (without --no-weights)")
        if kind == "file":
            return None, [f"the entry does not hold the backbone weights: it points at {recorded}, a file on this "
                          "machine only; serving it elsewhere needs --pretrained NEWPATH (drop --no-weights to store them)"]
        return None, [f"the entry does not hold the backbone weights: the serving machine needs {record.get('arch')} "
                      f"--pretrained {recorded} (network or a filled Hugging Face cache with HF_HUB_OFFLINE=1); "
                      "--with-weights stores them in the entry"]
    if pretrained:
        src = Path(pretrained).expanduser()
        if not src.is_file():
            raise ModelStoreError(f"--pretrained {pretrained}: not a file")
    elif kind == "file":
        src = Path(recorded).expanduser()
        if not src.is_file():
            sha = record.get("weights_sha256")
            raise ModelStoreError(f"this head's recorded backbone weights {recorded} are gone (moved or deleted): pass "
                                  f"their new location with --pretrained FILE" + (f" (sha256 {sha})" if sha else ""))
    elif kind == "tag":
        src = _cached_tag_file(str(record.get("arch")), recorded)
    else:
        raise ModelStoreError(f"--with-weights for {recorded}: pass the weights file with --pretrained FILE")
    try:  # the sha256 the head records, checked before anything is copied
        check_weights_override(record, str(src.resolve()))
    except BackboneError as err:
        raise ModelStoreError(str(err)) from None
    except OSError as err:  # unreadable
        raise ModelStoreError(f"{src}: cannot read the weights ({err.strerror or err})") from None
    return src, []


def _stored_weights_name(path: Path) -> str:
    """The name the weights get under `backbone/`: open_clip picks its loader by the extension
    (`.safetensors` -> safetensors, anything else -> torch.load), so the name follows the content,
    not the source's name (a moved `w.bak`, a Hugging Face cache blob named by its hash)."""
    from clipheads.training.files import read_safetensors_header

    name, suffix = path.name, ".safetensors"
    try:
        is_safetensors = read_safetensors_header(path) is not None
    except OSError as err:
        raise ModelStoreError(f"{path}: cannot read the weights ({err.strerror or err})") from None
    if is_safetensors and not name.endswith(suffix):
        return name + suffix
    if not is_safetensors and name.endswith(suffix):  # a pickled checkpoint under a safetensors name
        return name[: -len(suffix)] + ".pt"
    return name


def _check_new_tag(name: str, given: bool = True) -> str:
    """`name` as BentoML will store it, refused here (before anything is hashed or copied) when
    BentoML would refuse it: not a valid tag, the reserved version `latest`, a version that exists."""
    import bentoml
    from bentoml import Tag
    from bentoml.exceptions import BentoMLException, NotFound

    what = f"--name {name!r}" if given else f"the default name {name!r} (pass --name NAME)"
    try:  # lowercased here: BentoML would log "Converting ... to lowercase" lines before our one line
        tag = Tag.from_taglike(name.lower())
    except (BentoMLException, ValueError) as err:
        reason = str(err).split("valid BentoML tag: ", 1)[-1]
        raise ModelStoreError(f"{what} is not a valid model name (NAME or NAME:VERSION): {reason}") from None
    if tag.version == "latest":
        raise ModelStoreError(f"{what}: 'latest' always means the newest version; leave the version out for a new "
                              "one, or pick another")
    if tag.version:
        try:
            bentoml.models.get(tag)
        except NotFound:
            pass
        else:
            raise _taken(str(tag))
    return str(tag)


def _taken(tag: str) -> ModelStoreError:
    return ModelStoreError(f"{tag} already exists in the model store: pick another version (or leave it out for a "
                           f"new one), or remove it first with `bentoml models delete {tag}`")


def save_model(source: str | Path, name: Optional[str] = None, with_weights: Optional[bool] = None,
               pretrained: Optional[str] = None) -> SaveResult:
    """Copy a bundle or head (and, for a head, its backbone weights: see the module doc) into the
    local store."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    from clipheads.training.files import file_sha256

    src = Path(source).expanduser().resolve()
    kind, meta = _describe(src)
    tag = _check_new_tag(name or default_name(src), given=bool(name))
    weights, warnings, record = None, [], {}
    if kind == "head":
        from clipheads.training.head_header import read_head_header

        record = read_head_header(src).backbone
        weights, warnings = _weights_to_store(record, with_weights, pretrained)
    elif with_weights or pretrained:
        raise ModelStoreError(f"{src} is a bundle: its graphs hold the backbone already")
    meta["content_sha256"] = _content_sha256(src, kind)  # checked whenever the tag is resolved
    stored = None
    if weights is not None:
        try:
            stored = {"file": f"{WEIGHTS_DIR}/{_stored_weights_name(weights)}", "sha256": file_sha256(weights),
                      "bytes": weights.stat().st_size, "pretrained": str(record.get("pretrained") or "")}
        except OSError as err:
            raise ModelStoreError(f"{weights}: cannot read the weights ({err.strerror or err})") from None
        meta["backbone_weights"] = stored["file"]
    try:
        model = _create_entry(bentoml, tag, kind, meta, src, weights, stored)
    except BentoMLException as err:  # another `save` took the tag since _check_new_tag
        if "already exists" not in str(err):
            raise
        raise _taken(tag) from None
    # BentoML makes the entry directory 0700 (tempfile.mkdtemp, whose mode its copy into the store
    # keeps): give it and every directory in it the umask's mode, so a container running as another
    # user can read the mounted entry like the files in it
    entry = Path(bentoml.models.get(model.tag).path)
    for d in [entry, *(p for p in entry.rglob("*") if p.is_dir())]:
        apply_umask(d, is_dir=True)
    return SaveResult(str(model.tag), kind, stored, warnings)


def _create_entry(bentoml, tag: str, kind: str, meta: dict, src: Path, weights: Optional[Path],
                  stored: Optional[dict]):
    with bentoml.models.create(tag, labels={"framework": FRAMEWORK, "kind": kind}, metadata=meta) as model:
        dest = Path(model.path)
        # plain copies (new files get the umask's mode), not the source's modes: a head written
        # 0600 by an older clipheads must still be readable by the Bento's container user
        if kind == "bundle":
            shutil.copytree(src, dest / BUNDLE_DIR, copy_function=shutil.copyfile)
            for d in [dest / BUNDLE_DIR, *(p for p in (dest / BUNDLE_DIR).rglob("*") if p.is_dir())]:
                apply_umask(d, is_dir=True)
        else:
            shutil.copyfile(src, dest / HEAD_FILE)
        if stored is not None:
            (dest / WEIGHTS_DIR).mkdir()
            apply_umask(dest / WEIGHTS_DIR, is_dir=True)
            shutil.copyfile(weights, dest / stored["file"])
            (dest / WEIGHTS_RECORD).write_text(json.dumps(stored, indent=1))
    return model


def save(source: str | Path, name: Optional[str] = None, **kw) -> str:
    """Copy a bundle or head into the local store; returns the new tag ("name:version")."""
    return save_model(source, name, **kw).tag


def _bentoml():
    """BentoML, or a ModelStoreError saying how to get it (`clipheads[score]` alone has none)."""
    try:
        import bentoml
    except ImportError:
        raise ModelStoreError("the model store needs BentoML: pip install 'clipheads[serve]'") from None
    return bentoml


def resolve_source(ref: str | Path) -> Path:
    """An existing path is returned as is; otherwise `ref` is a model tag in the local store."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    return resolve_tag(str(ref))


def resolve_tag(tag: str) -> Path:
    """The bundle or head a model-store tag holds (never a file-system path: `/admin/reload` takes
    paths only inside its root, so a bare name must not find a file in the server's directory)."""
    bentoml = _bentoml()
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(tag)
    except (BentoMLException, ValueError) as err:
        raise ModelStoreError(f"{tag}: no such file, and not a model in the BentoML store ({err})") from None
    if model.info.labels.get("framework") != FRAMEWORK:
        raise ModelStoreError(f"{model.tag} is not a clipheads model (labels {model.info.labels})")
    root = Path(model.path)
    for candidate, kind in ((root / BUNDLE_DIR, "bundle"), (root / HEAD_FILE, "head")):
        if candidate.exists():
            want = (model.info.metadata or {}).get("content_sha256")
            if want and _content_sha256(candidate, kind) != want:  # entries saved before it was recorded: unchecked
                raise ModelStoreError(f"{model.tag}: the stored {kind} changed since it was saved (sha256 mismatch); "
                                      "save it again from its source")
            return candidate
    raise ModelStoreError(f"{model.tag}: the stored model holds neither {BUNDLE_DIR}/ nor {HEAD_FILE}")


def _content_sha256(path: Path, kind: str) -> str:
    """`runtimes.bundle.source_sha256` (a head file's, a bundle manifest's), unreadable as ModelStoreError."""
    from .runtimes.bundle import source_sha256

    try:
        return source_sha256(path)
    except OSError as err:
        raise ModelStoreError(f"{path}: cannot read the stored {kind} ({err.strerror or err})") from None


def list_models() -> list[dict]:
    import bentoml

    rows = []
    for m in bentoml.models.list():
        if m.info.labels.get("framework") == FRAMEWORK:
            rows.append({"tag": str(m.tag), "kind": m.info.labels.get("kind"), "created": str(m.info.creation_time)[:19],
                         **{k: v for k, v in m.info.metadata.items() if k in ("tasks", "method", "precision", "backbone_weights")}})
    return rows


def _default_bentofile() -> Path:
    """The repository's bentofile.yaml when running from a checkout, else ./bentofile.yaml (an
    installed wheel carries no bentofile: `make bento` builds from the checkout)."""
    repo = Path(__file__).resolve().parents[1] / "bentofile.yaml"
    return repo if repo.is_file() else Path.cwd() / "bentofile.yaml"


def bentofile(tag: str, base: Path) -> str:
    """`base` (the repository's bentofile.yaml) plus the model to serve: listed under `models:`
    (so the Bento, `bentoml export` of it and its container carry the entry, stored weights
    included) and named by CLIPHEADS_SOURCE."""
    import bentoml
    import yaml
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(tag)
    except (BentoMLException, ValueError) as err:
        raise ModelStoreError(f"{tag}: not a model in the BentoML store ({err})") from None
    if model.info.labels.get("framework") != FRAMEWORK:
        raise ModelStoreError(f"{model.tag} is not a clipheads model")
    cfg = yaml.safe_load(base.read_text())
    cfg["models"] = [str(model.tag)]
    cfg["envs"] = [e for e in cfg.get("envs") or [] if e.get("name") != "CLIPHEADS_SOURCE"]
    cfg["envs"].append({"name": "CLIPHEADS_SOURCE", "value": str(model.tag)})
    return yaml.safe_dump(cfg, sort_keys=False)


def _parser() -> console.ArgumentParser:
    p = console.ArgumentParser(prog="clipheads models", description="clipheads heads/bundles in BentoML's model store")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("save", help="copy a bundle or head (with its backbone weights, see --with-weights) into the store")
    s.add_argument("source", help="an export bundle directory or a *.head.safetensors file")
    s.add_argument("--name", default=None, help="model name (default: clipheads-<file or folder name>)")
    w = s.add_mutually_exclusive_group()
    w.add_argument("--with-weights", dest="with_weights", action="store_true", default=None,
                   help="store a head's backbone weights in the entry (default when the head records a local file)")
    w.add_argument("--no-weights", dest="with_weights", action="store_false",
                   help="store only the head (a warning says what the serving machine will need)")
    s.add_argument("--pretrained", default=None, metavar="FILE",
                   help="the backbone weights file to store (if it moved; sha256-checked against the head)")
    console.add_output_flags(s)
    ls = sub.add_parser("list", help="list clipheads models in the store")
    console.add_output_flags(ls)
    bf = sub.add_parser("bentofile", help="bentofile.yaml plus TAG under models: (`make bento MODEL=TAG`)")
    bf.add_argument("tag")
    bf.add_argument("--base", default=None, help="the bentofile to extend (default: the repository's bentofile.yaml, else ./bentofile.yaml)")
    bf.add_argument("--out", default=None, help="write here instead of stdout")
    console.add_output_flags(bf)
    return p


def _main(args) -> int:
    _bentoml()  # every subcommand works on BentoML's store
    if args.what == "save":
        res = save_model(args.source, args.name, with_weights=args.with_weights, pretrained=args.pretrained)
        if args.name and args.name != args.name.lower():
            console.info(f"clipheads models save: model names are lowercase: --name {args.name} is {res.tag}", args.quiet)
        for w in res.warnings:
            print(f"clipheads models save: warning: {w}", file=sys.stderr)
        if res.weights:
            console.info(f"clipheads models save: stored the backbone weights {res.weights['pretrained']} as "
                         f"{res.weights['file']} ({res.weights['bytes']:,} bytes, sha256 {res.weights['sha256'][:12]}…)",
                         args.quiet)
        console.emit(asdict(res), args.json, res.tag)
        return 0
    if args.what == "bentofile":
        base = Path(args.base) if args.base else _default_bentofile()
        if not base.is_file():
            raise ModelStoreError(f"{base}: no bentofile.yaml to extend (pass --base FILE)")
        text = bentofile(args.tag, base)
        if args.out:
            try:
                Path(args.out).expanduser().write_text(text)
            except OSError as err:
                raise ModelStoreError(f"--out {args.out}: cannot write it ({err.strerror or err})") from None
        console.emit({"bentofile": args.out, "model": args.tag}, args.json, "" if args.out else text.rstrip())
        return 0
    rows = list_models()
    lines = [f"{row['tag']:<48} {row['kind']:<7} {row['created']}  "
             + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("tag", "kind", "created")) for row in rows]
    console.emit(rows, args.json, "\n".join(lines) or "no clipheads models in the store")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, code = console.parse(_parser(), argv)
    if args is None:
        return code
    return console.run(f"clipheads models {args.what}", lambda: _main(args), (ModelStoreError,), as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
