"""Deterministic input listings for batch scoring (the output side is shards.py).

Input: a directory (recursive, sorted, hidden names skipped), a CSV or a Parquet manifest with a
`path` column. The listing order is fixed, so input number `i` always lands in shard
`i // shard_size`: a shard is a fixed slice of the inputs, identified by its number, its input
range and a sha256 of its keys.

Directory inputs: links are followed only while their target stays inside the input directory
(`follow_symlinks=True` follows any link; directories are entered once each, so link loops end).
A link leaving it, a directory named like an image file (`x.png/`) and a special file (FIFO,
socket, device) are listed as error records (`outside_input`, `not_a_file`), never opened and never
dropped silently; so is a name that is not valid UTF-8 (`bad_name`: Parquet and JSON hold only
text), its `path` written with backslash escapes for the bad bytes (`bad\\xffname.png`), and a
subdirectory that cannot be listed (`unreadable`, its `path` ending in `/`: its files are unknown).
An input directory that cannot be listed, or one that holds a Parquet dataset (part files, no
images), is a bad input. CSV listings may start with a UTF-8 byte-order mark.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence


class InputError(ValueError):
    """The input listing cannot be read (missing, wrong format, no path column)."""



# ---- input listing ---------------------------------------------------------------------------
# Names that look like image files: a directory with one of these suffixes is listed as an error.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PARQUET_SUFFIXES = (".parquet", ".pq")


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
            _check_image_dir(self.source)
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
            with open(self.source, newline="", encoding="utf-8-sig") as f:  # -sig: a leading BOM is not text
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
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if not rel:  # the input directory itself: nothing can be listed
                raise InputError(f"{self.source}: cannot list the input directory ({_os_reason(err)})") from None
            # its files are unknown: one error record for the directory, never a silent gap
            yield rel, str(d), ("unreadable", f"a directory that cannot be listed ({_os_reason(err)}); "
                                              "its files are not scored")
            return
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
            with open(self.source, newline="", encoding="utf-8-sig") as f:
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


def _os_reason(err: OSError) -> str:
    return f"{type(err).__name__}: {err.strerror or err}"


def _parquet_dataset_part(d: Path, depth: int = 0) -> Optional[str]:
    """A Parquet file of `d` if `d` is laid out as a Parquet dataset (what Spark, pyarrow
    `write_to_dataset`, pandas and `clipheads score` itself write): every visible top-level entry
    is a Parquet file or a Hive partition directory (`key=value/`) laid out the same way; hidden
    names and `_` markers (`_SUCCESS`, `_metadata`) aside. None: not a dataset (an image folder
    that also holds a Parquet file, or subfolders, is an image folder). Stops at the first entry
    that does not fit, so a large image folder costs one directory read."""
    found: Optional[str] = None
    try:
        with os.scandir(d) as it:
            for e in it:
                name = e.name.lower()
                if e.name.startswith(".") or (e.name.startswith("_") and not name.endswith(IMAGE_SUFFIXES)):
                    continue
                if name.endswith(PARQUET_SUFFIXES) and e.is_file():
                    part = e.path
                elif "=" in e.name and e.is_dir() and depth < 4:
                    part = _parquet_dataset_part(Path(e.path), depth + 1)
                    if part is None:
                        return None
                else:
                    return None
                found = part if found is None else min(found, part)
    except OSError:
        return None
    return found


def _check_image_dir(root: Path) -> None:
    """A directory --input must be listable and must not be a Parquet dataset (its part files
    would be 'scored' as broken images)."""
    try:
        with os.scandir(root):
            pass
    except OSError as err:
        raise InputError(f"{root}: cannot list the input directory ({_os_reason(err)})") from None
    part = _parquet_dataset_part(root)
    if part is not None:
        raise InputError(
            f"{root} is a Parquet dataset (a directory of Parquet part files), not a folder of images; "
            f"give one Parquet file as --input (e.g. {part}), or merge the parts into one first "
            f"(pyarrow.parquet.write_table(pyarrow.dataset.dataset('{root}').to_table(), 'paths.parquet'))"
        )


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
