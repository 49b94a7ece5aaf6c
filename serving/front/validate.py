"""Request-field checks of the front: each returns the clean value or raises a 4xx `ApiError`."""
from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any, Optional

from ..images import ImageRejected
from .config import ServeConfig
from .errors import ApiError
from .labels import clean_labels
from .templates import check_templates as template_problems


def read_images(cfg: ServeConfig, images: list[Path | bytes], images_b64: list[str], limit: int) -> list[bytes]:
    """The request's image bytes: uploaded files (BentoML's temp paths, or the bytes themselves
    from the fast path, fast.py) and base64 strings."""
    n = len(images) + len(images_b64)
    if n == 0:
        raise ApiError(422, "no_images", "send at least one image (multipart 'images' files or JSON 'images_b64')")
    if n > limit:
        raise ApiError(422, "too_many_images", f"{n} images; at most {limit} per request")
    blobs: list[bytes] = []
    cap = cfg.max_body_bytes
    for p in images:
        in_memory = isinstance(p, (bytes, bytearray))
        if (len(p) if in_memory else Path(p).stat().st_size) > cap:  # size before reading a file
            raise ImageRejected("too_many_bytes", f"image over {cap} bytes", 413)
        blobs.append(bytes(p) if in_memory else Path(p).read_bytes())
    for i, s in enumerate(images_b64):
        if not isinstance(s, str) or len(s) > cap * 4 // 3 + 4:
            raise ImageRejected("too_many_bytes", f"image_b64[{i}] over {cap} bytes", 413)
        if s.startswith("data:") and "," in s[:100]:
            s = s.split(",", 1)[1]
        try:
            blobs.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", f"images_b64[{i}] is not valid base64") from None
    return blobs


def check_labels(cfg: ServeConfig, labels: Any, what: str = "labels") -> list[str]:
    out, problem = clean_labels(labels, cfg.max_labels, cfg.max_label_chars, what)
    if problem:
        raise ApiError(422, *problem)
    return out


def check_templates(cfg: ServeConfig, templates: Optional[list[str]]) -> tuple[str, ...]:
    problem = template_problems(templates, cfg.max_templates)
    if problem:
        raise ApiError(422, problem[0], problem[1])
    return tuple(templates) if templates else ("a photo of a {}.",)


def check_top_k(top_k: Any) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 1000:
        raise ApiError(422, "invalid_top_k", "top_k must be an integer from 1 to 1000")
    return top_k


def reload_root(cfg: ServeConfig) -> Optional[Path]:
    """The folder reload paths must lie in: --reload-root, else the served source's folder (None
    when the server was started from a model-store tag without --reload-root)."""
    if cfg.reload_root:
        return Path(cfg.reload_root).resolve()
    served = Path(cfg.source)
    return served.resolve().parent if served.exists() else None


def reload_source(cfg: ServeConfig, source: Any) -> Path:
    """A model-store tag, or an existing path inside the reload root (after resolving symlinks).
    Answers never name server paths, and a path outside the root gets the same answer whether it
    exists or not (the root is checked before the file system is asked; a bare name not in the root
    is looked up as a tag only, not relative to the server's working directory)."""
    from ..model_store import ModelStoreError, resolve_tag

    if not isinstance(source, str) or not source.strip() or len(source) > 512 or "\x00" in source:
        raise ApiError(422, "invalid_source", "'source' is a model tag or a path (at most 512 characters)")
    root = reload_root(cfg)
    pathlike = source.startswith(("/", ".", "~")) or "/" in source
    refused = ApiError(422, "source_not_allowed", f"{source[:200]!r} is not a file inside the reload root"
                       if root is not None else "reloading from a path needs --reload-root; or give a model tag")
    try:  # `~nosuchuser`, a name over NAME_MAX, a symlink loop: the file system's errors are a 422 too
        given = Path(source).expanduser()
        if root is not None:
            candidate = (given if given.is_absolute() else root / given).resolve()
            if candidate.is_relative_to(root) and candidate.exists():
                return candidate
    except (OSError, RuntimeError, ValueError):
        if pathlike:
            raise refused from None
        raise ApiError(422, "unknown_source", f"no model {source[:200]!r} in the model store") from None
    if pathlike:
        raise refused
    try:
        return resolve_tag(source)  # a bare name outside the root is a tag, never a file elsewhere
    except ModelStoreError:
        raise ApiError(422, "unknown_source", f"no model {source[:200]!r} in the model store") from None


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"/:]+/)*[^\s'\":,)]*")


def without_server_paths(detail: str, path: Path, source: str) -> str:
    """An encoder's reason for refusing a head, with the server's paths taken out: the head's own
    path as the client named it, any other absolute path as <path>."""
    return _ABSOLUTE_PATH.sub("<path>", detail.replace(str(path), source[:200]))
