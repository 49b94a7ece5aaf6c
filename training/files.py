"""File helpers with no heavy imports, shared by training, export and serving."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

_MAX_HEADER_BYTES = 64 << 20  # a safetensors JSON header is KBs to a few MBs; refuse absurd claims
_sha_memo: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks. Memoised per process on (path, size, mtime): backbone
    weights are hundreds of MB and are hashed each time a head or bundle records or checks them."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _sha_memo:
        return _sha_memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _sha_memo[key] = h.hexdigest()
    return _sha_memo[key]


class NotSafetensors(ValueError):
    """The file is not a (readable) safetensors file; the message says why."""


def read_safetensors_header(path: str | os.PathLike, strict: bool = False) -> Optional[dict]:
    """Parse a safetensors header ourselves (8-byte length + JSON): clear reasons for pickles, zips
    and truncated files instead of a library stack trace. `strict=False` returns None for a file
    that is not safetensors; `strict=True` raises NotSafetensors, also when the tensors' bytes run
    past the end of the file."""
    def fail(why: str) -> None:
        if strict:
            raise NotSafetensors(f"{path}: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return fail("too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > _MAX_HEADER_BYTES:
            return fail("not a safetensors file (bad header length; pickled or other format?)")
        raw = f.read(n)
    if len(raw) != n or not raw.lstrip().startswith(b"{"):
        return fail("not a safetensors file (header is not JSON)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return fail(f"corrupt safetensors header: {err}")
    if not isinstance(header, dict):
        return fail("corrupt safetensors header: not a JSON object")
    if strict:  # whole, too: every tensor's bytes inside the file (a cut-off download, a partial copy)
        try:
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (KeyError, TypeError, ValueError, IndexError):
            return fail("corrupt safetensors header: a tensor entry without valid data offsets")
        if os.path.getsize(path) < 8 + n + end:
            return fail("the file ends before its tensors do (truncated?)")
    return header


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else by the
    set-and-restore dance."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """What open()/mkdir() would give a new file/directory: 0644/0755 under the usual umask 022."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def apply_umask(path: str | os.PathLike, is_dir: bool = False) -> None:
    """Give `path` the umask's default mode. For files some library created private (safetensors
    writes 0600, tempfile.mkdtemp 0700), so a container running as another user can read our
    heads, bundles and outputs."""
    os.chmod(path, default_mode(is_dir))
