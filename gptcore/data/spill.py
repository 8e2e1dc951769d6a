"""Spill files: the documents a worker process kept, written for the parent to read back, without pickle.

A spill file is a sequence of Arrow IPC streams, one per batch, each with its own schema: the
columns `id`, `text`, `source`, `source_name`, `minhash` with near dedup on, then `meta:NAME`
for each metadata field. Nothing in it is code, so reading one runs nothing whoever wrote it
(the project keeps pickle out of files; see `gptcore.results`).

The parent must see each document exactly as the worker held it, or the outputs would differ
with the worker count. So the strings travel as UTF-8 bytes with lone surrogates kept (a JSON
`"\\ud800"` escape makes one, and an Arrow string column refuses it), and a metadata column is
kept as Arrow only when its values come back from Arrow unchanged, type included. Values whose
type varies across records (JSONL: `1` beside `2.5` would come back `1.0`) are stored as JSON
text instead; a batch whose values fit neither is split until they do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from gptcore.data.sources import Document
from gptcore.errors import InputError

BATCH_BYTES = 8 << 20  # of text: what a batch holds in memory, on either side
_FIELDS = ("id", "text", "source", "source_name")
_META = "meta:"
_AS_JSON = {b"as": b"json"}  # a column's field metadata: its values are JSON text


class SpillWriter:
    """Writes documents to a spill file, a batch of about BATCH_BYTES of text at a time; a context manager."""

    def __init__(self, path: Path):
        self.file = pa.OSFile(str(path), "wb")
        self.batch: list[Document] = []
        self.batch_bytes = 0

    def add(self, doc: Document) -> None:
        # a batch's documents share their metadata names (a unit's always do): one column each
        if self.batch and doc.metadata.keys() != self.batch[0].metadata.keys():
            self.flush()
        self.batch.append(doc)
        self.batch_bytes += len(doc.text)
        if self.batch_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self._write(self.batch)
        self.batch, self.batch_bytes = [], 0

    def __enter__(self) -> SpillWriter:
        return self

    def __exit__(self, error_type, *_) -> None:
        try:
            if error_type is None:  # a failed task's file is not read: nothing more to write
                self.flush()
        finally:
            self.file.close()

    def _write(self, docs: list[Document]) -> None:
        columns = {name: _utf8([getattr(d, name) for d in docs]) for name in _FIELDS}
        if docs[0].minhash is not None:  # near dedup is on for every document or none
            columns["minhash"] = pa.array([d.minhash for d in docs], pa.binary())
        fields = [pa.field(name, column.type) for name, column in columns.items()]
        for name in docs[0].metadata:
            values = [d.metadata[name] for d in docs]
            stored = _exact_column(values)
            if stored is None:
                if len(docs) == 1:
                    raise InputError(
                        f"{docs[0].id}: metadata field {name!r} holds {values[0]!r}, which neither Arrow nor "
                        "JSON stores unchanged; it cannot be passed between ingest workers (ingest.workers: 1)"
                    )
                half = len(docs) // 2  # values that fit apart but not together: each half on its own
                self._write(docs[:half])
                self._write(docs[half:])
                return
            column, as_json = stored
            columns[_META + name] = column
            fields.append(pa.field(_META + name, column.type, metadata=_AS_JSON if as_json else None))
        batch = pa.record_batch(list(columns.values()), schema=pa.schema(fields))
        with pa.ipc.new_stream(self.file, batch.schema) as stream:
            stream.write_batch(batch)


def read_spill(path: Path) -> Iterator[Document]:
    """The documents of a spill file in the order written, a batch in memory at a time."""
    with pa.OSFile(str(path), "rb") as f:
        while f.tell() < f.size():
            for batch in pa.ipc.open_stream(f):
                strings = [[s.decode("utf-8", "surrogatepass") for s in batch.column(n).to_pylist()] for n in _FIELDS]
                metadata = {}
                for field, column in zip(batch.schema, batch.columns):
                    if field.name.startswith(_META):
                        values = column.to_pylist()
                        as_json = field.metadata == _AS_JSON
                        metadata[field.name[len(_META) :]] = [json.loads(v) for v in values] if as_json else values
                signatures = batch.column("minhash").to_pylist() if "minhash" in batch.schema.names else None
                for i, (doc_id, text, source, source_name) in enumerate(zip(*strings)):
                    meta = {name: values[i] for name, values in metadata.items()}
                    signature = None if signatures is None else signatures[i]
                    yield Document(doc_id, text, source, meta, source_name, signature)


def _utf8(strings: list[str]) -> pa.Array:
    return pa.array([s.encode("utf-8", "surrogatepass") for s in strings], pa.large_binary())


def _exact_column(values: list[Any]) -> tuple[pa.Array, bool] | None:
    """(column, as JSON) holding `values` so that they read back the same, or None if neither can."""
    try:
        column = pa.array(values)
        if _same(column.to_pylist(), values):
            return column, False
    except (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError):
        pass  # pyarrow refuses such values in several ways; JSON may still hold them
    try:
        texts = [json.dumps(v) for v in values]
        if _same([json.loads(t) for t in texts], values):
            return pa.array(texts, pa.large_string()), True
    except (TypeError, ValueError):
        pass
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal and of one type, all the way down: `1` is not `1.0`, `-0.0` not `0.0`, NaN is NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b
