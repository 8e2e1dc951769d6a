"""Batch scoring of a file of texts with an ONNX classifier, into Parquet (no torch)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from gptcore.errors import InputError
from gptcore.fsutil import atomic_file
from gptcore.runtime.classifier import OnnxClassifier

log = logging.getLogger("gptcore.runtime")

READERS = (".parquet", ".jsonl", ".csv")


def read_table(path: str | Path, text_field: str):
    """The input as a pyarrow Table with a string column `text_field` and no nulls in it."""
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix == ".jsonl":
            import pyarrow.json as pj

            table = pj.read_json(path)
        elif suffix == ".csv":
            import pyarrow.csv as pc

            table = pc.read_csv(path)
        else:
            raise InputError(f"{path}: unsupported input type {suffix!r}; use one of {', '.join(READERS)}")
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: cannot be read as {suffix[1:]}: {e}") from None
    if text_field not in table.column_names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
    column = table.column(text_field)
    if column.null_count:
        row = column.to_pylist().index(None)
        raise InputError(f"{path}: row {row}: column {text_field!r} is empty (null)")
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise InputError(f"{path}: column {text_field!r} holds {column.type}, not text")
    return table


def score_file(model: OnnxClassifier, input_path: str | Path, output_path: str | Path, text_field: str = "text",
               batch_size: int = 64) -> int:
    """Write the input rows plus `label`, `confidence` and `prob_<label>` columns to Parquet; return the row count.

    The output file appears only once complete (written to a temporary name, then renamed).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = read_table(input_path, text_field)
    texts = table.column(text_field).to_pylist()
    n, start, probs = len(texts), time.perf_counter(), []
    log_every = max(1, (n // batch_size) // 10) * batch_size  # about ten progress lines
    for i in range(0, n, batch_size):
        probs.append(model.predict_proba(texts[i : i + batch_size], batch_size))
        done = min(i + batch_size, n)
        if done % log_every == 0 or done == n:
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("score: %d/%d rows | %.1f rows/s | ETA %.0fs", done, n, rate, (n - done) / rate)
    p = np.concatenate(probs) if probs else np.zeros((0, len(model.labels)))
    labels = np.asarray(model.labels)
    table = table.append_column("label", pa.array(labels[p.argmax(axis=1)].tolist() if n else [], pa.string()))
    table = table.append_column("confidence", pa.array(p.max(axis=1) if n else [], pa.float64()))
    for k, label in enumerate(model.labels):
        table = table.append_column(f"prob_{label}", pa.array(p[:, k], pa.float64()))
    with atomic_file(output_path) as tmp:
        pq.write_table(table, tmp)
    return n
