"""A crash-safe sharded Parquet output for batch scoring (the inputs: listing.py).

Output: `OUT.parquet/` is a directory readable as one dataset (`pyarrow.dataset`, pandas, Spark,
DuckDB `read_parquet('OUT.parquet/*.parquet')`):

    OUT.parquet/
      _manifest.json            job identity + every committed part (the source of truth)
      part-00000.parquet        scored rows of inputs [0, shard_size)
      part-00001.parquet        ...
      part-00002-01733.parquet  a shard committed in pieces: inputs [2*S + 1733, ...) of shard 2
      _errors/part-00000.jsonl  rejected inputs of that part (one JSON object per line)
      _lock                     held (flock) by the one job writing OUT; a second one is refused

A part is a contiguous range of one shard: the whole shard, or a piece committed early because
`commit_every_s` passed (so a killed job loses at most that much work even inside a large shard).
A part commits in three atomic steps (write a temp file, fsync, rename, fsync the directory): its
errors, its Parquet file, then the manifest that lists it. A crash at any point leaves either a
committed part or one that is not in the manifest and is recomputed (and overwritten) on the next
run; a committed part is never rescored and rows are never duplicated. A part whose Parquet file
or errors sidecar is missing is lost and recomputed. One job at a time writes OUT: the store holds
an exclusive lock on `OUT/_lock` from before it reads the manifest until `close()`.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from .listing import Shard

MANIFEST = "_manifest.json"
ERRORS_DIR = "_errors"
ERRORS_FILE = "_errors.jsonl"  # the errors file's default place (run.py)
LOCK = "_lock"  # flock'ed by the job writing OUT ('_': readers of OUT as a dataset skip it)
OUTPUT_FORMAT = "clipheads-scores"
OUTPUT_FORMAT_VERSION = 2  # 2: nested `predictions` struct, fixed-size lists, provenance in every part
METADATA_KEY = "clipheads"  # each part's Parquet key-value metadata: JSON, see part_metadata


class OutputConflict(ValueError):
    """OUT exists and belongs to a different job, or the inputs changed under a committed shard."""


# ---- crash-safe output ------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(fileobj)` into a temp file next to `path`, fsync it, rename over `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def part_id(shard_id: int, offset: int = 0) -> str:
    """The manifest key of a part: the shard number, plus the piece's offset inside the shard when
    it does not start the shard."""
    return f"{shard_id:05d}" if offset == 0 else f"{shard_id:05d}-{offset:05d}"


def part_name(shard_id: int, offset: int = 0) -> str:
    return f"part-{part_id(shard_id, offset)}.parquet"


# Job identity fields that must match for a run to continue an existing output.
IDENTITY_KEYS = ("source_sha256", "tasks", "top_k", "embeddings", "shard_size", "input", "max_bytes", "max_pixels")


def _same(key: str, old, new) -> bool:
    """One identity field of an existing output vs this run's. `tasks` ({task: labels}) compares
    in order too: it is the field order of every part's `predictions` struct."""
    if key == "tasks" and isinstance(old, dict) and isinstance(new, dict):
        return list(old.items()) == list(new.items())
    return old == new


def _written_by_scoring(p: Path, also: frozenset = frozenset()) -> bool:
    """Whether `p`, an entry of an output folder, is one a scores job writes: the manifest, the
    lock, parts, temp files of an interrupted commit, the errors folder holding only such files,
    the default errors file or one of `also` (errors files --errors put in OUT)."""
    def ours(q: Path, top: bool) -> bool:
        return q.is_file() and not q.is_symlink() and (
            q.name in (MANIFEST, ERRORS_FILE, LOCK) or (top and q.name in also)
            or (q.name.startswith("part-") and q.suffix in (".parquet", ".jsonl"))
            or (q.name.startswith(".") and ".tmp-" in q.name))

    if p.name == ERRORS_DIR and p.is_dir() and not p.is_symlink():
        return all(ours(q, False) for q in p.iterdir())
    return ours(p, True)


def _lock(root: Path) -> Optional[int]:
    """An exclusive, non-blocking flock on `root/_lock` (held until the fd is closed, also by a
    killed process: the kernel drops it). Raises OutputConflict if another job holds it. None
    where the filesystem has no locks (a warning: concurrent runs are not detected there)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputConflict(
                f"another clipheads score job is writing {root} (it holds {root / LOCK}); "
                "wait for it to finish, or use another --output") from None
        warnings.warn(f"cannot lock {root / LOCK} ({err.strerror or err}): a second job writing "
                      f"{root} at the same time would not be detected", RuntimeWarning, stacklevel=3)
        return None
    return fd


class ShardStore:
    """The output directory: which shards are committed, and committing new ones."""

    def __init__(self, out: str | os.PathLike, identity: dict, overwrite: bool = False,
                 errors_file: Optional[str | os.PathLike] = None):
        self.root = Path(out).expanduser().resolve()
        self.identity = identity
        self.shard_size = int(identity.get("shard_size") or 0)
        self.shards: dict[str, dict] = {}  # committed parts by part_id (a whole shard: its number)
        self._ours = frozenset()  # errors files in OUT (--errors OUT/_name): ours for --overwrite
        if errors_file is not None and Path(errors_file).expanduser().resolve().parent == self.root:
            self._ours = frozenset({Path(errors_file).name})
        self._lock_fd: Optional[int] = None
        if self.root.exists() and not self.root.is_dir():
            raise OutputConflict(f"{self.root} exists and is not a directory")
        if self.root.exists():  # refuse a folder that is not ours before creating the lock in it
            self._refuse_foreign(overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.root)
        try:
            self._open(overwrite)  # under the lock: the checks again, --overwrite, the manifest
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release OUT's lock (the lock file stays: removing it would let two jobs lock two files)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _foreign_without_manifest(self) -> bool:
        """OUT has no manifest and holds something other than our errors folder, lock and
        hidden temp files."""
        return not (self.root / MANIFEST).is_file() and any(
            p.name not in (ERRORS_DIR, LOCK) and not p.name.startswith(".") for p in self.root.iterdir())

    def _refuse_foreign(self, overwrite: bool) -> None:
        if overwrite:
            self._clearable()
        elif self._foreign_without_manifest():
            raise OutputConflict(f"{self.root} exists, is not empty and has no {MANIFEST}; use --overwrite")

    def _open(self, overwrite: bool) -> None:
        mpath = self.root / MANIFEST
        if overwrite:
            self._clear()
        if mpath.is_file():
            try:
                m = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise OutputConflict(f"{mpath}: unreadable manifest ({err}); use --overwrite to start over") from None
            if m.get("format") != OUTPUT_FORMAT or m.get("format_version") != OUTPUT_FORMAT_VERSION:
                raise OutputConflict(f"{mpath}: not a clipheads-scores v{OUTPUT_FORMAT_VERSION} output")
            old = m.get("job") or {}
            diff = [k for k in IDENTITY_KEYS if not _same(k, old.get(k), self.identity.get(k))]
            if diff:
                unrecorded = [k for k in diff if k not in old]
                raise OutputConflict(
                    f"{self.root} holds a different job (differs in: {', '.join(diff)}"
                    + (f"; not recorded by the clipheads that wrote it: {', '.join(unrecorded)}" if unrecorded else "")
                    + "); use another --output, or --overwrite to discard it"
                )
            self.shards = {str(k): v for k, v in (m.get("shards") or {}).items()}
            self.created = m.get("created")
        else:
            if self._foreign_without_manifest():
                raise OutputConflict(f"{self.root} exists, is not empty and has no {MANIFEST}; use --overwrite")
            self.created = time.time()
        new = not mpath.is_file()
        (self.root / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
        if new:  # before the first part: a run killed before its first manifest commit still resumes
            self.write_manifest()
        self._sweep()

    def check_listing(self, total: int) -> None:
        """Raises OutputConflict if a committed part covers inputs the listing no longer has (its
        last shard, or more, disappeared): those rows would stay in OUT for inputs that are gone."""
        for rec in sorted(self.shards.values(), key=lambda r: r["start"]):
            if rec["stop"] > total:
                raise OutputConflict(
                    f"the inputs of committed part {rec['file']} changed since it was written "
                    f"(inputs {rec['start']}..{rec['stop']}; the listing now has {total}); "
                    "use a new --output or --overwrite"
                )

    def _clearable(self) -> list[Path]:
        """The entries --overwrite deletes (the lock aside); raises OutputConflict, deleting
        nothing, unless OUT is a scores output holding only files a scores job writes."""
        entries = [p for p in self.root.iterdir() if p.name != LOCK]
        if not entries:
            return []
        try:
            m = json.loads((self.root / MANIFEST).read_text())
            fmt = m.get("format")
        except (OSError, ValueError, AttributeError):
            m, fmt = None, None
        if fmt != OUTPUT_FORMAT:
            raise OutputConflict(f"--overwrite refuses to clear {self.root}: it is not a clipheads-scores output")
        also = set(self._ours)
        last = (m.get("last_run") or {}).get("errors_file") if isinstance(m.get("last_run"), dict) else None
        if isinstance(last, str) and Path(last).parent == self.root and Path(last).name.startswith("_"):
            also.add(Path(last).name)  # an errors file an earlier run put in OUT
        foreign = [p.name for p in entries if not _written_by_scoring(p, frozenset(also))]
        if foreign:
            raise OutputConflict(f"--overwrite refuses to clear {self.root}: it holds files a scores job does not "
                                 f"write ({', '.join(sorted(foreign)[:5])}); move them or choose another --output")
        return entries

    def _clear(self) -> None:
        """--overwrite: remove an earlier scores output, only ever files a scores job writes; a
        folder holding anything else (a `_manifest.json` of another tool, the user's own files) is
        refused whole, nothing deleted. The manifest goes last: an interrupted --overwrite leaves
        a folder that is still a scores output (and --overwrite clears it again)."""
        entries = self._clearable()
        for p in sorted(entries, key=lambda p: p.name == MANIFEST):
            if p.is_dir():
                for q in p.iterdir():
                    q.unlink()
                p.rmdir()
            else:
                p.unlink()
        if entries:
            _fsync_dir(self.root)

    def _sweep(self) -> None:
        """Remove temp files and parts that no manifest lists (left by a crash mid-commit)."""
        keep = {v["file"] for v in self.shards.values()}
        for p in self.root.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink()
            elif p.name.startswith("part-") and p.name not in keep:
                p.unlink()
        for p in (self.root / ERRORS_DIR).iterdir():
            if p.name.startswith(".") or p.with_suffix(".parquet").name not in keep:
                p.unlink()

    def _parts_of(self, shard_id: int) -> list[tuple[str, dict]]:
        return sorted(((k, v) for k, v in self.shards.items() if int(v.get("shard", k.split("-")[0])) == shard_id),
                      key=lambda kv: kv[1]["start"])

    def remaining(self, shard: Shard) -> Optional[Shard]:
        """The part of `shard` no earlier run committed (None: all of it is committed). Raises
        OutputConflict if the inputs under a committed part changed since it was written."""
        covered = shard.start
        for key, rec in self._parts_of(shard.id):
            if rec["stop"] <= shard.start:
                continue  # before this piece of the shard
            piece = shard.piece(rec["start"], rec["stop"])
            if rec["start"] != covered or rec["stop"] > shard.stop or piece.keys_sha256 != rec["keys_sha256"]:
                raise OutputConflict(
                    f"the inputs of committed part {rec['file']} changed since it was written "
                    f"(inputs {rec['start']}..{rec['stop']}); use a new --output or --overwrite"
                )
            if not (self.root / rec["file"]).is_file() or not self._sidecar(rec["file"]).is_file():
                break  # lost (its rows or its errors): recompute from here (the parts after it are overwritten too)
            covered = rec["stop"]
        if covered == shard.stop:
            return None
        return shard.piece(covered, shard.stop)

    def _sidecar(self, part_file: str) -> Path:
        return self.root / ERRORS_DIR / part_file.replace(".parquet", ".jsonl")

    def committed(self, shard: Shard) -> bool:
        """True when all of `shard` was committed by an earlier run."""
        return self.remaining(shard) is None

    def commit(self, piece: Shard, table, errors: list[dict], extra: Optional[dict] = None) -> dict:
        """Atomically publish one part (a whole shard or a piece of one): errors sidecar, Parquet
        file, then the manifest."""
        import pyarrow.parquet as pq

        offset = piece.start - piece.id * self.shard_size if self.shard_size else 0
        key, name = part_id(piece.id, offset), part_name(piece.id, offset)
        err_path = self._sidecar(name)
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode("utf-8")
        atomic_write(err_path, lambda f: f.write(lines))
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(self.part_metadata(piece, name, extra))})
        atomic_write(self.root / name, lambda f: pq.write_table(table, f, compression="zstd"))
        rec = {
            "file": name,
            "shard": piece.id,
            "start": piece.start,
            "stop": piece.stop,
            "first": piece.items[0].key if piece.items else None,
            "last": piece.items[-1].key if piece.items else None,
            "keys_sha256": piece.keys_sha256,
            "rows": table.num_rows,
            "errors": len(errors),
            "committed_at": time.time(),
            **(extra or {}),
        }
        replaced = [k for k, old in self._parts_of(piece.id) if old["start"] >= piece.start and k != key]
        for k in replaced:  # parts this one supersedes (recomputed after a lost file)
            self.shards.pop(k)
        self.shards[key] = rec
        self.write_manifest()
        for k in replaced:
            name_k = part_name(piece.id, int(k.split("-")[1]) if "-" in k else 0)
            (self.root / name_k).unlink(missing_ok=True)
            self._sidecar(name_k).unlink(missing_ok=True)
        return rec

    def part_metadata(self, piece: Shard, name: str, extra: Optional[dict]) -> dict:
        """What every part carries in its Parquet key-value metadata (key `clipheads`), so a part
        copied out of OUT still says what it is: the column meanings, the source (bundle or head
        sha256 and version, its heads, backbone, tasks and labels, preprocessing), the runtime
        and engine that produced these rows, and which inputs it covers."""
        from clipheads import __version__

        from .columns import COLUMN_DOCS

        return {
            "format": OUTPUT_FORMAT, "format_version": OUTPUT_FORMAT_VERSION, "package_version": __version__,
            "columns": COLUMN_DOCS,
            **{k: v for k, v in self.identity.items() if k != "input"},
            **(extra or {}),
            "part": {"file": name, "shard": piece.id, "start": piece.start, "stop": piece.stop,
                     "keys_sha256": piece.keys_sha256},
        }

    def write_manifest(self, complete: bool = False, summary: Optional[dict] = None) -> None:
        m = {
            "format": OUTPUT_FORMAT,
            "format_version": OUTPUT_FORMAT_VERSION,
            "job": self.identity,
            "created": self.created,
            "updated": time.time(),
            "complete": complete,
            "rows": sum(v["rows"] for v in self.shards.values()),
            "errors": sum(v["errors"] for v in self.shards.values()),
            "shards": {k: self.shards[k] for k in sorted(self.shards, key=lambda k: self.shards[k]["start"])},
        }
        if summary:
            m["last_run"] = summary
        data = json.dumps(m, indent=1).encode()
        atomic_write(self.root / MANIFEST, lambda f: f.write(data))

    def iter_errors(self) -> Iterator[dict]:
        for rec in sorted(self.shards.values(), key=lambda r: r["start"]):
            p = self._sidecar(rec["file"])
            if p.is_file():
                with open(p, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            yield json.loads(line)

    def write_errors_file(self, dest: Path) -> int:
        """All committed shards' errors in input order, streamed (never all held in memory):
        JSONL, or CSV (index,path,kind,detail) when `dest` ends in .csv."""
        import io

        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        as_csv = dest.suffix.lower() == ".csv"
        n = 0

        def write(f) -> None:
            nonlocal n
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=["index", "path", "kind", "detail"], lineterminator="\n")
            if as_csv:
                w.writeheader()
            for row in self.iter_errors():
                n += 1
                if as_csv:
                    w.writerow(row)
                else:
                    buf.write(json.dumps(row, ensure_ascii=False) + "\n")
                if buf.tell() > 1 << 16:
                    f.write(buf.getvalue().encode("utf-8"))
                    buf.seek(0)
                    buf.truncate()
            f.write(buf.getvalue().encode("utf-8"))

        atomic_write(dest, write)
        return n
