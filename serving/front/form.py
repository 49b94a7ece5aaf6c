"""The fields of a `POST /classify` body, read strictly and cheaply for the fast path (fast.py).

BentoML's request path for the same body (Starlette's form parser, a temp file per uploaded image,
pydantic validation) cost the front more CPU than the rest of the request did. This reads the body
the guard already holds in memory (capped, complete) with `bytes.find`: no temp files, no copies
beyond one slice per part. It only reads what it is *sure* of: the four fields of /classify with
the exact types the API declares (the same checks as BentoML's parsing + pydantic: `images` files,
`images_b64` a list of strings, `tasks` a list of strings or null, `top_k` an int, not a bool).
Anything else -- an unknown field, a repeated or file-valued text field, a preamble, non-UTF-8
text, a value that is not the declared type, more parts than a request can use -- returns None,
and the guard hands the request to BentoML's route unchanged, which answers it as it always did
(so every odd input keeps today's answer, and this parser never has to reproduce a library's
error messages).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from python_multipart.multipart import parse_options_header

from .body import loads_strict, lone_surrogate

_TEXT_FIELDS = ("images_b64", "tasks", "top_k")
_JSON_FIELDS = frozenset(("images", *_TEXT_FIELDS))
MAX_BOUNDARY = 200  # RFC 2046 allows 70; longer ones go to the library path
_FIELD_PARTS = len(_TEXT_FIELDS)


@dataclass
class ClassifyFields:
    """A /classify request's fields, typed as the API declares them."""

    images: list[bytes] = field(default_factory=list)  # uploaded files' bytes
    images_b64: list[str] = field(default_factory=list)
    tasks: Optional[list[str]] = None
    top_k: int = 5


def _typed(values: dict[str, Any]) -> Optional[ClassifyFields]:
    """The declared types (strict, as the API's pydantic model), or None when any value differs."""
    out = ClassifyFields()
    if "images_b64" in values:
        v = values["images_b64"]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            return None
        out.images_b64 = v
    if "tasks" in values:
        v = values["tasks"]
        if v is not None and (not isinstance(v, list) or not all(isinstance(s, str) for s in v)):
            return None
        out.tasks = v
    if "top_k" in values:
        v = values["top_k"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1000:
            return None  # a wrong value keeps the library path's answer (and its wording)
        out.top_k = v
    return out


def json_fields(body: bytes) -> Optional[ClassifyFields]:
    """`{"images_b64": [...], "tasks": [...], "top_k": 5}` (the guard checked shape and depth)."""
    try:
        data = loads_strict(body or b"{}")
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not data.keys() <= _JSON_FIELDS:
        return None
    if "images" in data and data["images"] != []:  # files in JSON: the library's answer
        return None
    return _typed(data)


def _disposition(headers: bytes) -> Optional[tuple[bytes, Optional[bytes]]]:
    """(name, filename or None) from a part's header block; None when it is not plain form-data."""
    found = None
    for line in headers.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if not sep or key != key.strip():  # "Name : value" is no header to python-multipart either
            return None
        if key.lower() == b"content-disposition":
            if found is not None:
                return None
            kind, params = parse_options_header(value.strip())
            if kind != b"form-data" or b"name" not in params or b"\0" in params.get(b"filename", b""):
                return None  # the library path's answer (a NUL in a filename is its 400)
            found = (params[b"name"], params.get(b"filename"))
    return found


def multipart_truncated(body: bytes, content_type: str) -> bool:
    """A multipart body with a boundary but no closing delimiter (`--BOUNDARY--`): cut off in
    transit. python-multipart would hand over the parts it finished and drop the rest silently."""
    try:
        _, params = parse_options_header(content_type)
    except ValueError:
        return False
    boundary = params.get(b"boundary", b"")
    if not boundary:
        return False  # the library's own 400
    close = b"--" + boundary + b"--"
    return not (body.startswith(close) or body.rfind(b"\r\n" + close) >= 0)  # it sits at the end


def multipart_fields(body: bytes, content_type: str, max_images: int) -> Optional[ClassifyFields]:
    """A strict `multipart/form-data` read: `images` file parts and at most one part each of
    `images_b64`, `tasks`, `top_k` (JSON text, as BentoML reads them)."""
    try:
        _, params = parse_options_header(content_type)
    except ValueError:
        return None
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        return None
    delim = b"--" + boundary
    sep = b"\r\n" + delim
    if not body.startswith(delim):
        return None
    images: list[bytes] = []
    texts: dict[str, Any] = {}
    pos, parts = len(delim), 0
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter; an epilogue after it is ignored
            break
        if not body.startswith(b"\r\n", pos):
            return None
        hend = body.find(b"\r\n\r\n", pos)
        if hend < 0:
            return None
        disp = _disposition(body[pos + 2:hend])
        dend = body.find(sep, hend + 4)
        if disp is None or dend < 0:
            return None
        parts += 1
        if parts > max_images + _FIELD_PARTS:
            return None
        name, filename = disp
        if name == b"images" and filename is not None:
            images.append(body[hend + 4:dend])
        elif filename is None and name.decode("latin-1") in _TEXT_FIELDS and name.decode("latin-1") not in texts:
            try:
                value = loads_strict(body[hend + 4:dend])
            except (ValueError, RecursionError):
                return None
            if any(isinstance(v, str) and lone_surrogate(v) for v in (value if isinstance(value, list) else [value])):
                return None  # the library's answer (pydantic refuses the field)
            texts[name.decode("latin-1")] = value
        else:
            return None
        pos = dend + len(sep)
    out = _typed(texts)
    if out is not None:
        out.images = images
    return out
