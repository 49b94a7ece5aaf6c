"""Deterministic input listings and a crash-safe sharded Parquet output (batch scoring).

Input: a directory (recursive, sorted, hidden names skipped), a CSV or a Parquet manifest with a
`path` column. The listing order is fixed, so input number `i` always lands in shard
`i // shard_size`: a shard is a fixed slice of the inputs, identified by its number, its input
range and a sha256 of its keys.

Directory inputs: links are followed only while their target stays inside the input directory
(`follow_symlinks=True` follows any link; directories are entered once each, so link loops end).
A link leaving it, a directory named like an image file (`x.png/`) and a special file (FIFO,
socket, device) are listed as error records (`outside_input`, `not_a_file`), never opened and never
dropped silently; so is a name that is not valid UTF-8 (`bad_name`: Parquet and JSON hold only
text), its `path` written with backslash escapes for the bad bytes (`bad\\xffname.png`).

Output: `OUT.parquet/` is a directory readable as one dataset (`pyarrow.dataset`, pandas, Spark,
DuckDB `read_parquet('OUT.parquet/*.parquet')`):

    OUT.parquet/
      _manifest.json            job identity + every committed part (the source of truth)
      part-00000.parquet        scored rows of inputs [0, shard_size)
      part-00001.parquet        ...
      part-00002-01733.parquet  a shard committed in pieces: inputs [2*S + 1733, ...) of shard 2
      _errors/part-00000.jsonl  rejected inputs of that part (one JSON object per line)

A part is a contiguous range of one shard: the whole shard, or a piece committed early because
`commit_every_s` passed (so a killed job loses at most that much work even inside a large shard).
A part commits in three atomic steps (write a temp file, fsync, rename, fsync the directory): its
errors, its Parquet file, then the manifest that lists it. A crash at any point leaves either a
committed part or one that is not in the manifest and is recomputed (and overwritten) on the next
run; a committed part is never rescored and rows are never duplicated.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

MANIFEST = "_manifest.json"
ERRORS_DIR = "_errors"
OUTPUT_FORMAT = "clipheads-scores"
OUTPUT_FORMAT_VERSION = 2  # 2: nested `predictions` struct, fixed-size lists, provenance in every part
METADATA_KEY = "clipheads"  # each part's Parquet key-value metadata: JSON, see part_metadata


class InputError(ValueError):
    """The input listing cannot be read (missing, wrong format, no path column)."""


class OutputConflict(ValueError):
    """OUT exists and belongs to a different job, or the inputs changed under a committed shard."""


# ---- input listing ---------------------------------------------------------------------------
# Names that look like image files: a directory with one of these suffixes is listed as an error.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputItem:
    index: int  # position in the listing: the row's identity
    key: str  # what the output's `path` column holds (relative to DIR, or as written in the manifest)
    location: str  # the file to read
    error: Optional[tuple[str, str]] = None  # (kind, detail) when the listing already rejects it


@dataclass(frozen=True)
class Shard:
    id: int
    start: int  # first input index (inclusive)
    items: tuple[InputItem, ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.items)

    @property
    def keys_sha256(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(it.key.encode("utf-8", "surrogateescape"))
            h.update(b"\n")
        return h.hexdigest()

    def piece(self, start: int, stop: int) -> "Shard":
        """The inputs [start, stop) of this shard, as a shard with the same id."""
        return Shard(self.id, start, self.items[start - self.start:stop - self.start])


class InputListing:
    """Iterates (key, location) in a fixed order without holding the whole listing."""

    def __init__(self, source: str | os.PathLike, path_column: str = "path", exclude: Sequence[Path] = (),
                 follow_symlinks: bool = False):
        src = Path(source).expanduser()
        if not src.exists():
            raise InputError(f"input not found: {src}")
        self.source = src.resolve()
        self.path_column = path_column
        self.follow_symlinks = follow_symlinks
        self._exclude = {str(Path(p).resolve()) for p in exclude}  # compared with scandir paths under the resolved root
        if src.is_dir():
            self.kind = "dir"
        elif src.suffix.lower() == ".csv":
            self.kind = "csv"
        elif src.suffix.lower() in (".parquet", ".pq"):
            self.kind = "parquet"
        else:
            raise InputError(f"{src}: --input must be a directory, a .csv or a .parquet file")
        self._check()

    def describe(self) -> dict:
        d = {"kind": self.kind, "source": str(self.source), "path_column": self.path_column if self.kind != "dir" else None}
        if self.kind == "dir" and self.follow_symlinks:
            d["follow_symlinks"] = True  # which inputs are errors differs: part of the job's identity
        return d

    # -- readers --
    def _csv_problem(self, err: Exception, line: int) -> InputError:
        if isinstance(err, UnicodeDecodeError):
            # the text reader decodes ahead of the csv reader: its line count says nothing about
            # where the bad byte is, so find it in the bytes (only on this error path)
            where = _first_bad_utf8(self.source)
            at = f"line {where[0]}, byte offset {where[1]}" if where else "somewhere"
            return InputError(f"{self.source}: not UTF-8 text ({at}: {err.reason})")
        return InputError(f"{self.source}: not a readable CSV (near line {line}: {err})")

    def _check(self) -> None:
        if self.kind == "csv":
            with open(self.source, newline="", encoding="utf-8") as f:
                try:
                    header = next(csv.reader(f), None)
                except (UnicodeDecodeError, csv.Error) as err:
                    raise self._csv_problem(err, 1) from None
            if not header or self.path_column not in header:
                raise InputError(f"{self.source}: CSV needs a header with a {self.path_column!r} column (got {header})")
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.ParquetFile(self.source).schema_arrow
            except Exception as err:  # noqa: BLE001 - any parse failure is a bad input
                raise InputError(f"{self.source}: not a readable Parquet file ({err})") from None
            if self.path_column not in schema.names:
                raise InputError(f"{self.source}: Parquet has no {self.path_column!r} column (columns: {schema.names})")

    def _inside(self, real: str) -> bool:
        root = str(self.source)
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def _walk(self, d: Path, rel: str, seen: set) -> Iterator[tuple[str, str, Optional[tuple[str, str]]]]:
        """(key, location, listing error or None) in sorted order; `seen`: directories entered."""
        try:
            st = os.stat(d)
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return  # an unreadable subdirectory has no listable files
        if (st.st_dev, st.st_ino) in seen:
            return  # a link loop, or a directory reached twice through links
        seen.add((st.st_dev, st.st_ino))
        for e in entries:
            if e.name.startswith(".") or e.path in self._exclude:
                continue
            key = f"{rel}{e.name}"
            try:
                path = e.path
                if e.is_symlink():
                    path = os.path.realpath(e.path)
                    if not self.follow_symlinks and not self._inside(path):
                        yield key, e.path, ("outside_input", "a symbolic link to outside the input directory "
                                                             "(not followed; --follow-symlinks to score it)")
                        continue
                    if path in self._exclude:
                        continue
                if os.path.isdir(path) if path != e.path else e.is_dir(follow_symlinks=False):
                    if key.lower().endswith(IMAGE_SUFFIXES):
                        yield key, path, ("not_a_file", "a directory named like an image file")
                    yield from self._walk(Path(path), key + "/", seen)
                elif path != e.path and not os.path.exists(path):
                    yield key, e.path, None  # a dangling link inside the root: reported as unreadable
                elif os.path.isfile(path) if path != e.path else e.is_file(follow_symlinks=False):
                    yield key, path, None
                else:
                    yield key, path, ("not_a_file", "not a regular file (FIFO, socket or device)")
            except OSError:
                yield key, e.path, None

    def _walk_checked(self) -> Iterator[tuple[str, str, Optional[tuple[str, str]]]]:
        """`_walk`, with every key made valid text: a name that is not UTF-8 (surrogate-escaped by
        os.scandir) cannot be a Parquet string or a JSON error record, so it is listed as a
        `bad_name` error under a printable key (its bad bytes as `\\xNN`), never opened."""
        for key, loc, err in self._walk(self.source, "", set()):
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                key = os.fsencode(key).decode("utf-8", "backslashreplace")
                err = err or ("bad_name", "the file name is not valid UTF-8 (shown with \\x escapes); "
                                          "rename it to score it")
            yield key, loc, err

    def _rows(self) -> Iterator[str]:
        if self.kind == "csv":
            # a bad byte or an over-long field anywhere is a bad input: `count()` reads every row
            # before the first shard is scored, so it stops the job before anything is written
            with open(self.source, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                try:
                    for row in reader:
                        yield row.get(self.path_column) or ""
                except (UnicodeDecodeError, csv.Error) as err:
                    raise self._csv_problem(err, reader.line_num + 1) from None
        else:
            for batch in self._parquet_batches():
                for v in batch.column(0).to_pylist():
                    yield "" if v is None else str(v)

    def _parquet_batches(self):
        """The path column, batch by batch; any read failure (a corrupt page, a truncated file)
        is a bad input."""
        import pyarrow.parquet as pq

        try:
            for batch in pq.ParquetFile(self.source).iter_batches(columns=[self.path_column], batch_size=8192):
                yield batch
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise InputError(f"{self.source}: not a readable Parquet file ({type(err).__name__}: {err})") from None

    def __iter__(self) -> Iterator[tuple[str, str, Optional[tuple[str, str]]]]:
        """(key, location, listing error or None) for every input, in the fixed order."""
        if self.kind == "dir":
            yield from self._walk_checked()
            return
        base = str(self.source.parent)
        for p in self._rows():  # os.path, not pathlib: pathlib interns every path part
            loc = os.path.expanduser(p) if p.startswith("~") else p
            yield p, loc if os.path.isabs(loc) else os.path.join(base, loc), None

    def count(self) -> int:
        """Number of inputs (a cheap pass: names only, nothing is opened). Every name is read (the
        Parquet path column too, not only its metadata's row count), so a listing that cannot be
        read fails here, before the output is touched."""
        if self.kind == "parquet":
            return sum(b.num_rows for b in self._parquet_batches())
        return sum(1 for _ in self)

    def shards(self, shard_size: int) -> Iterator[Shard]:
        """Fixed slices of `shard_size` inputs; only the current shard's names are held."""
        buf: list[InputItem] = []
        sid = 0
        for i, (key, loc, err) in enumerate(self):
            buf.append(InputItem(i, key, loc, err))
            if len(buf) == shard_size:
                yield Shard(sid, i + 1 - shard_size, tuple(buf))
                sid, buf = sid + 1, []
        if buf:
            yield Shard(sid, sid * shard_size, tuple(buf))


def _first_bad_utf8(path: Path, chunk: int = 1 << 20) -> Optional[tuple[int, int]]:
    """(line, byte offset) of the first byte that is not valid UTF-8 in `path`, or None."""
    dec = codecs.getincrementaldecoder("utf-8")()
    pos = lines = 0  # bytes fed so far; newlines in them
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                try:
                    dec.decode(data, final=not data)
                except UnicodeDecodeError as err:
                    # err.object: the bytes held back from the last chunk (an unfinished sequence,
                    # never a newline) followed by this chunk
                    held = len(err.object) - len(data)
                    return lines + err.object[:err.start].count(b"\n") + 1, pos - held + err.start
                if not data:
                    return None
                pos += len(data)
                lines += data.count(b"\n")
    except OSError:
        return None


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
IDENTITY_KEYS = ("source_sha256", "tasks", "top_k", "embeddings", "shard_size", "input")


def _same(key: str, old, new) -> bool:
    """One identity field of an existing output vs this run's. `tasks` ({task: labels}) compares
    in order too: it is the field order of every part's `predictions` struct."""
    if key == "tasks" and isinstance(old, dict) and isinstance(new, dict):
        return list(old.items()) == list(new.items())
    return old == new


class ShardStore:
    """The output directory: which shards are committed, and committing new ones."""

    def __init__(self, out: str | os.PathLike, identity: dict, overwrite: bool = False):
        self.root = Path(out).expanduser().resolve()
        self.identity = identity
        self.shard_size = int(identity.get("shard_size") or 0)
        self.shards: dict[str, dict] = {}  # committed parts by part_id (a whole shard: its number)
        mpath = self.root / MANIFEST
        if self.root.exists() and not self.root.is_dir():
            raise OutputConflict(f"{self.root} exists and is not a directory")
        if overwrite and self.root.exists():
            self._clear()
        if mpath.is_file():
            try:
                m = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise OutputConflict(f"{mpath}: unreadable manifest ({err}); use --overwrite to start over") from None
            if m.get("format") != OUTPUT_FORMAT or m.get("format_version") != OUTPUT_FORMAT_VERSION:
                raise OutputConflict(f"{mpath}: not a clipheads-scores v{OUTPUT_FORMAT_VERSION} output")
            old = m.get("job") or {}
            diff = [k for k in IDENTITY_KEYS if not _same(k, old.get(k), identity.get(k))]
            if diff:
                raise OutputConflict(
                    f"{self.root} holds a different job (differs in: {', '.join(diff)}); "
                    "use another --output, or --overwrite to discard it"
                )
            self.shards = {str(k): v for k, v in (m.get("shards") or {}).items()}
            self.created = m.get("created")
        else:
            if self.root.exists() and any(p.name != ERRORS_DIR and not p.name.startswith(".") for p in self.root.iterdir()):
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

    def _clear(self) -> None:
        if not (self.root / MANIFEST).is_file() and any(self.root.iterdir()):
            raise OutputConflict(f"--overwrite refuses to clear {self.root}: it is not a clipheads-scores output")
        for p in sorted(self.root.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()

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
            if not (self.root / rec["file"]).is_file():
                break  # lost: recompute from here (the parts after it are overwritten too)
            covered = rec["stop"]
        if covered == shard.stop:
            return None
        return shard.piece(covered, shard.stop)

    def committed(self, shard: Shard) -> bool:
        """True when all of `shard` was committed by an earlier run."""
        return self.remaining(shard) is None

    def commit(self, piece: Shard, table, errors: list[dict], extra: Optional[dict] = None) -> dict:
        """Atomically publish one part (a whole shard or a piece of one): errors sidecar, Parquet
        file, then the manifest."""
        import pyarrow.parquet as pq

        offset = piece.start - piece.id * self.shard_size if self.shard_size else 0
        key, name = part_id(piece.id, offset), part_name(piece.id, offset)
        err_path = self.root / ERRORS_DIR / name.replace(".parquet", ".jsonl")
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
            (self.root / ERRORS_DIR / name_k.replace(".parquet", ".jsonl")).unlink(missing_ok=True)
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
            p = self.root / ERRORS_DIR / rec["file"].replace(".parquet", ".jsonl")
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
