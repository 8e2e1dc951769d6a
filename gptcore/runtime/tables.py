"""Input files of texts (.parquet, .jsonl, .csv) read in checked chunks, without torch.

Parquet streams through `ParquetFile.iter_batches`, CSV through pyarrow's streaming reader,
JSONL line by line, so memory holds one chunk, never the file. Every chunk is checked: the text
column exists, holds text and no nulls; an error names the file and the row. A record (a JSONL
line, a CSV row, quoted line breaks and all) may be up to MAX_RECORD_BYTES; a longer one is an
error naming its line (JSONL) or the rows around it (CSV), read no further than the bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gptcore.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = (".parquet", ".jsonl", ".csv")
CSV_BLOCK_BYTES = 16 << 20  # a streamed CSV's column types are inferred from its first block
# The longest record read. A CSV row must fit in one block of pyarrow's reader, so it is the
# block; a JSONL line is held whole while parsed, so it gets the same bound.
MAX_RECORD_BYTES = CSV_BLOCK_BYTES
JSON_BLOCK_BYTES = 1 << 20  # pyarrow's default; a block is widened to hold the chunk's longest line


class TextChunks:
    """The input file as tables of `chunk_rows` rows (the last one shorter; one empty table for an
    empty file), each checked: column `text_field` holds strings and no nulls.

    `total_rows` is exact for Parquet (from its metadata); for CSV and JSONL `estimated_rows()`
    extrapolates the rows read so far by the share of the file's bytes they came from.
    """

    def __init__(self, path: str | Path, text_field: str, chunk_rows: int):
        self.path, self.text_field, self.chunk_rows = Path(path), text_field, chunk_rows
        self.suffix = self.path.suffix.lower()
        if self.suffix not in SUFFIXES:
            raise InputError(f"{self.path}: unsupported input type {self.suffix!r}; use one of {', '.join(SUFFIXES)}")
        if not self.path.exists():
            raise InputError(f"{self.path}: input file not found")
        if not self.path.is_file():  # a FIFO would block the reader, a device may never end
            raise InputError(f"{self.path}: not a regular file (a directory, FIFO or device): refused")
        self.size = self.path.stat().st_size
        self.total_rows: int | None = None
        self.rows_read = 0  # rows the reader has handed over, chunked or still pending
        self._file = None

    def estimated_rows(self) -> int | None:
        if self.total_rows is not None:
            return self.total_rows
        if self._file is None or self._file.closed or self.rows_read == 0:
            return None
        return max(self.rows_read, round(self.rows_read * self.size / max(self._file.tell(), 1)))

    def __iter__(self) -> Iterator[pa.Table]:
        import pyarrow as pa

        start = 0
        try:
            for chunk in self._chunks():
                self.check(chunk, start)
                yield chunk
                start += chunk.num_rows
        except pa.ArrowException as e:
            hint = ""
            if self.suffix == ".csv" and "straddl" in str(e):
                hint = f" (a row longer than {MAX_RECORD_BYTES >> 20} MiB: records up to that are read)"
            elif self.suffix == ".csv":
                hint = (
                    f" (a CSV streams with the column types inferred from its first {CSV_BLOCK_BYTES >> 20} MB; "
                    "a column whose values change type later needs the file as Parquet or JSONL)"
                )
            raise InputError(
                f"{self.path}: rows from {start} (counting from 0): cannot be read as {self.suffix[1:]}: {e}{hint}"
            ) from None
        finally:
            if self._file is not None:
                self._file.close()

    def _chunks(self) -> Iterator[pa.Table]:
        if self.suffix == ".jsonl":
            yield from self._jsonl_chunks()
            return
        if self.suffix == ".parquet":
            import pyarrow.parquet as pq

            reader = pq.ParquetFile(self.path)
            schema, self.total_rows = reader.schema_arrow, reader.metadata.num_rows
            batches = reader.iter_batches(batch_size=self.chunk_rows)
        else:
            import pyarrow as pa
            import pyarrow.csv as pcsv

            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by __iter__; tell() measures progress
            # The text column stays text even where it looks like numbers ("007" stays "007").
            reader = pcsv.open_csv(
                self._file,
                read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                # quoted texts may hold line breaks: block boundaries must respect the quotes
                parse_options=pcsv.ParseOptions(newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(column_types={self.text_field: pa.string()}),
            )
            schema, batches = reader.schema, reader
        self.check_schema(schema)
        yield from self._rechunk(batches, schema)

    def _rechunk(self, batches, schema: pa.Schema) -> Iterator[pa.Table]:
        """Tables of exactly chunk_rows rows from record batches of any size (a row group, a CSV block)."""
        import pyarrow as pa

        pending: list[pa.RecordBatch] = []
        held, yielded = 0, False
        for batch in batches:
            self.rows_read += batch.num_rows
            pending.append(batch)
            held += batch.num_rows
            while held >= self.chunk_rows:
                table = pa.Table.from_batches(pending, schema)
                yield table.slice(0, self.chunk_rows)
                yielded = True
                rest = table.slice(self.chunk_rows)
                pending, held = rest.to_batches(), rest.num_rows
        if held or not yielded:
            yield pa.Table.from_batches(pending, schema)

    def _jsonl_chunks(self) -> Iterator[pa.Table]:
        """Each chunk parsed on its own, so a field that is null in early records and text later
        reads as text (pyarrow's streaming JSON reader fixes the types from its first block)."""
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by __iter__
        lines: list[bytes] = []
        longest, lineno, yielded = 0, 0, False
        while line := self._file.readline(MAX_RECORD_BYTES + 1):
            lineno += 1
            if len(line) > MAX_RECORD_BYTES:
                raise InputError(
                    f"{self.path}: line {lineno}: a record longer than {MAX_RECORD_BYTES >> 20} MiB "
                    f"(records up to {MAX_RECORD_BYTES >> 20} MiB are read; a longer text needs splitting)"
                )
            if line.strip():
                lines.append(line if line.endswith(b"\n") else line + b"\n")
                longest = max(longest, len(lines[-1]))
            if len(lines) == self.chunk_rows:
                self.rows_read += len(lines)
                yield _parse_jsonl(lines, longest)
                lines, longest, yielded = [], 0, True
        if lines or not yielded:
            self.rows_read += len(lines)
            yield _parse_jsonl(lines, longest) if lines else _empty_text_table(self.text_field)

    def check_schema(self, schema: pa.Schema) -> None:
        import pyarrow as pa

        if self.text_field not in schema.names:
            raise InputError(f"{self.path}: no text column {self.text_field!r} (columns: {', '.join(schema.names)})")
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise InputError(f"{self.path}: column {self.text_field!r} holds {kind}, not text")

    def check(self, chunk: pa.Table, start: int) -> None:
        """The chunk's text column exists, is text and has no nulls; errors name the row in the file."""
        import pyarrow.compute as pc

        self.check_schema(chunk.schema)
        column = chunk.column(self.text_field)
        if column.null_count:
            row = start + pc.index(pc.is_null(column), True).as_py()
            raise InputError(f"{self.path}: row {row} (counting from 0): column {self.text_field!r} is null")


def read_table(path: str | Path, text_field: str) -> pa.Table:
    """The whole input as one table, checked as `TextChunks` checks it (for files that fit in memory)."""
    import pyarrow as pa

    return pa.concat_tables(TextChunks(path, text_field, 1 << 20), promote_options="permissive")


def _parse_jsonl(lines: list[bytes], longest: int) -> pa.Table:
    """One table of JSON lines; pyarrow fails on a record longer than its block, so the block holds the longest."""
    import io

    import pyarrow.json as pjson

    options = pjson.ReadOptions(block_size=max(JSON_BLOCK_BYTES, longest + 1))
    return pjson.read_json(io.BytesIO(b"".join(lines)), read_options=options)


def _empty_text_table(text_field: str) -> pa.Table:
    import pyarrow as pa

    return pa.table({text_field: pa.array([], pa.string())})
