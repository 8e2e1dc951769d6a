"""Where a source's documents lie, and their bytes: a source's kind, the units a task reads (a
file; a Parquet file's row group), the files of a path, directory or glob, each checked to be a
regular file inside its source, and compressed files read to their end.

A FIFO blocks its reader until something writes to it and a device may never end, so neither is
read; a symlink leading out of a source directory would read a file the source does not hold.
A .gz or .zst file that ends early raises EOFError instead of ending as if complete.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gptcore.errors import InputError

FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".csv")
_SCHEME = re.compile(r"^([A-Za-z][\w+.-]+):")  # two letters at least: 'C:' is a drive, not a scheme


@dataclass(frozen=True)
class SourceUnit:
    """What one task reads: a file of a source (a row group of a Parquet file of several), the
    Shakespeare corpus, or a hub dataset."""

    spec: str
    path: Path | None = None
    key: str | None = None
    """A file's name within its source (`stable_name`): its documents' ids start with it."""
    row_group: int | None = None


def source_units(sources: list[str]) -> list[SourceUnit]:
    """The units of the sources, in input order (a directory's or glob's files sorted)."""
    units = []
    for spec in sources:
        if source_kind(spec) != "files":
            units.append(SourceUnit(spec))
            continue
        for path in expand_paths(spec):
            key = stable_name(path, spec)
            if file_suffix(path) == ".parquet" and (groups := open_parquet(path).num_row_groups) > 1:
                units += [SourceUnit(spec, path, key, g) for g in range(groups)]  # a task a row group
            else:
                units.append(SourceUnit(spec, path, key))
    return units


def unit_bytes(unit: SourceUnit) -> int | None:
    """The bytes of source a unit reads (a row group: its share of the file); None where unknown (a hub dataset)."""
    if unit.path is None:
        return None
    size = unit.path.stat().st_size
    return size if unit.row_group is None else size // open_parquet(unit.path).num_row_groups


def open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        # buffer_size: column chunks are read a MiB at a time rather than whole
        return pq.ParquetFile(path, buffer_size=1 << 20)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None


def source_kind(spec: str) -> str:
    """`shakespeare`, `hf` or `files`; an unknown `scheme:` is an error."""
    if spec == "shakespeare":
        return "shakespeare"
    scheme = _SCHEME.match(spec)
    if scheme and scheme.group(1) == "hf":
        return "hf"
    if scheme:
        raise InputError(
            f"source {spec!r}: unknown source kind {scheme.group(1)!r}; "
            "use 'shakespeare', a path or glob of files, or 'hf:NAME[:CONFIG][@SPLIT]'"
        )
    return "files"


def file_suffix(path: Path) -> str:
    """`.jsonl.gz` for a compressed JSONL file, else the last suffix, lower-cased."""
    name = path.name.lower()
    return next((s for s in FILE_SUFFIXES if s.count(".") > 1 and name.endswith(s)), path.suffix.lower())


def expand_paths(spec: str) -> list[Path]:
    """A file, a directory (its supported files, recursively) or a glob, in sorted order.

    Each is a regular file, and for a directory or glob one inside it once symlinks are followed
    (`regular_file`); a single file named as the source may be a symlink to anywhere.
    """
    root = source_root(spec)
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if not Path(p).is_dir())
        if not paths:
            raise InputError(f"source {spec!r}: the glob matches no files")
        return [regular_file(p, root) for p in paths]
    path = Path(spec)
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if file_suffix(p) in FILE_SUFFIXES and not p.is_dir())
        if not paths:
            raise InputError(f"source {spec!r}: the directory holds no {'/'.join(FILE_SUFFIXES)} files")
        return [regular_file(p, root) for p in paths]
    if not path.exists() and not path.is_symlink():
        raise InputError(f"source {spec!r}: no such file or directory")
    return [regular_file(path, None)]


def regular_file(path: Path, root: Path | None) -> Path:
    """`path` if it is a regular file (inside `root`, symlinks followed), else InputError.

    A FIFO blocks its reader until something writes to it, and a device may never end; a symlink
    out of the source directory reads a file the source does not hold (a secret, another corpus).
    """
    target = path.resolve()
    if root is not None and not target.is_relative_to(root.resolve()):
        raise InputError(
            f"{path}: leads to {target}, outside the source directory {root}: refused "
            "(copy the file into the source, or name it as a source of its own)"
        )
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: a broken symlink (to {target})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: {_file_kind(mode)}, not a regular file: refused (it could block or never end)")
    return path


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a directory" if stat.S_ISDIR(mode) else "a special file"


def source_root(spec: str) -> Path | None:
    """The directory a source's files must stay in: the directory, or a glob's fixed prefix; None for one file."""
    if glob.has_magic(spec):
        prefix = re.split(r"[*?\[]", spec, maxsplit=1)[0]  # the part before the first wildcard
        return Path(prefix) if prefix.endswith(("/", os.sep)) else Path(prefix).parent
    return Path(spec) if Path(spec).is_dir() else None


def stable_name(path: Path, spec: str) -> str:
    """The file's name relative to its source (directory, or a glob's fixed prefix).

    Document ids build on it, and the split hashes ids: the same corpus splits the same way
    wherever it lies and however its path is spelled.
    """
    root = source_root(spec)
    if root is None:
        return path.name
    return path.resolve().relative_to(root.resolve()).as_posix()


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed while read for .gz and .zst; truncated or corrupt compressed
    data raises EOFError (gzip's own; `_ZstdReader`'s) or zlib.error, never a silent early end."""
    suffix = file_suffix(path)
    if suffix.endswith(".gz"):
        return gzip.open(path, "rb")
    if suffix.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame, that fails where a frame is cut short.

    zstandard's `stream_reader` ends a truncated frame as if the data ended there (a silently
    shorter corpus); a `decompressobj` says whether its frame is complete (`eof`). Input goes in
    small pieces because one piece's output is held whole: zstd expands at most about 32768x.
    """

    PIECE_BYTES = 4096

    def __init__(self, path: Path):
        import zstandard

        self._zstd, self._path = zstandard, path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._frame = None  # the decompressobj of the frame being read
        self._input = b""  # compressed bytes read past the end of the last frame
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if not self._decompress_piece():
                return 0
        n = min(len(buffer), len(self._output))
        buffer[:n], self._output = self._output[:n], self._output[n:]
        return n

    def _decompress_piece(self) -> bool:
        data = self._input or self._file.read(self.PIECE_BYTES)
        if not data:
            if self._frame is not None and not self._frame.eof:
                raise EOFError("the file ends inside a zstd frame (truncated)")
            return False
        if self._frame is None or self._frame.eof:
            self._frame = self._zstd.ZstdDecompressor().decompressobj()
        try:
            self._output = memoryview(self._frame.decompress(data))
        except self._zstd.ZstdError as e:
            raise EOFError(f"corrupt zstd data: {e}") from None
        self._input = self._frame.unused_data if self._frame.eof else b""
        return True

    def close(self) -> None:
        self._file.close()
        super().close()
