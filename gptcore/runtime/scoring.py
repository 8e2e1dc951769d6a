"""Batch scoring of a file of texts with an ONNX classifier, into Parquet (no torch)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptcore.errors import InputError
from gptcore.fsutil import atomic_file
from gptcore.runtime.classifier import OnnxClassifier

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("gptcore.runtime")

SUFFIXES = (".parquet", ".jsonl", ".csv")
PROGRESS_LINES = 10


def read_table(path: str | Path, text_field: str) -> pa.Table:
    """The input as a table whose column `text_field` holds strings and no nulls."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported input type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise InputError(f"{path}: input file not found")
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".jsonl":
            table = pjson.read_json(path)
        else:
            # Read the text column as text even where it looks like numbers ("007" stays "007").
            options = pcsv.ConvertOptions(column_types={text_field: pa.string()})
            table = pcsv.read_csv(path, convert_options=options)
    except pa.ArrowException as e:
        raise InputError(f"{path}: cannot be read as {suffix[1:]}: {e}") from None
    if text_field not in table.column_names:
        raise InputError(f"{path}: no text column {text_field!r} (columns: {', '.join(table.column_names)})")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise InputError(f"{path}: column {text_field!r} holds {column.type}, not text")
    if column.null_count:
        row = column.to_pylist().index(None)
        raise InputError(f"{path}: row {row} (counting from 0): column {text_field!r} is null")
    return table


def set_aside_clashes(table: pa.Table, output_columns: list[str]) -> pa.Table:
    """Rename input columns the predictions will take (a labelled test split has `label`) to input_<name>."""
    names = list(table.column_names)
    for i, name in enumerate(names):
        if name in output_columns:
            new = f"input_{name}"
            while new in names or new in output_columns:
                new = f"input_{new}"
            log.warning("score: input column %r renamed to %r; the prediction takes its name", name, new)
            names[i] = new
    return table.rename_columns(names)


def score_file(model: OnnxClassifier, input_path: str | Path, output_path: str | Path, text_field: str = "text",
               batch_size: int = 64) -> int:
    """Write the input rows plus `label`, `confidence` and `prob_<label>` columns to Parquet; return the row count.

    The output file appears only once complete (written to a temporary name, then renamed).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    table = read_table(input_path, text_field)
    texts = table.column(text_field).to_pylist()
    n, start, probs = len(texts), time.perf_counter(), []
    log_every = max(1, n // (batch_size * PROGRESS_LINES)) * batch_size
    for i in range(0, n, batch_size):
        probs.append(model.predict_proba(texts[i : i + batch_size], batch_size))
        done = min(i + batch_size, n)
        if done % log_every == 0 or done == n:
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("score: %d/%d rows | %.1f rows/s | ETA %.0fs", done, n, rate, (n - done) / rate)
    p = np.concatenate(probs) if probs else np.zeros((0, len(model.labels)))

    prob_columns = {f"prob_{label}": pa.array(p[:, k], pa.float64()) for k, label in enumerate(model.labels)}
    predictions = {
        "label": pa.array(np.asarray(model.labels)[p.argmax(axis=1)].tolist(), pa.string()),
        "confidence": pa.array(p.max(axis=1), pa.float64()),
        **prob_columns,
    }
    table = set_aside_clashes(table, list(predictions))
    for name, values in predictions.items():
        table = table.append_column(name, values)
    with atomic_file(output_path) as tmp:
        pq.write_table(table, tmp)
    return n
