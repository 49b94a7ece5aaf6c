"""File helpers with no heavy imports, shared by training, export and serving."""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
