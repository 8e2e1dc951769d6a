"""The sources read and cleaned, on a cluster, in worker processes or in this one, the documents in input order.

A task reads and cleans one unit of the sources (`source_units`: a file, a row group of a
Parquet file of several, the Shakespeare corpus, a hub dataset) and, with near dedup on, signs
each kept document (its MinHash). With more than one worker (`ingest.workers`), or on a Dask
cluster (`ingest.cluster`), each task runs in a worker process (`gptcore.data.executor`) that
writes the documents to a spill file (Arrow, not pickle: `gptcore.data.spill`), a batch at a
time; the parent reads the spill files back in the order of the units. So what follows (dedup,
split, write) sees the same documents in the same order wherever the tasks ran, and writes the
same bytes. Tasks run at most two a worker ahead of the parent: memory holds a batch a process,
disk the cleaned text of those tasks, beside the output. What a task logs (a skipped record's
warning) is logged again by the parent, so it reaches the stage's log as it would from one
process.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from gptcore.config import IngestConfig
from gptcore.data.dedup import minhash
from gptcore.data.executor import describe, in_process, ordered_results
from gptcore.data.files import SourceUnit, source_units
from gptcore.data.filters import Cleaner
from gptcore.data.sources import Document, Reader
from gptcore.data.spill import SpillWriter, read_spill
from gptcore.fsutil import atomic_file

log = logging.getLogger("gptcore.data")


def record_fields(cfg: IngestConfig) -> list[str]:
    """The record fields every document must carry: the metadata asked for, and the group field."""
    group = [cfg.group_field] if cfg.group_field not in (None, "source", *cfg.metadata_fields) else []
    return [*cfg.metadata_fields, *group]


def make_reader(cfg: IngestConfig) -> Reader:
    return Reader(
        cfg.text_field,
        record_fields(cfg),
        cfg.invalid_utf8,
        cfg.bad_records,
        cfg.max_document_bytes,
        cfg.hf_streaming,
        cfg.max_row_group_bytes,
    )


def clean_unit(cfg: IngestConfig, reader: Reader, cleaner: Cleaner, unit: SourceUnit) -> Iterator[Document]:
    """The documents of one unit that cleaning keeps, their text cleaned, with their MinHash
    signatures when near dedup is on (computed here, in the workers, the costly half of it)."""
    for doc in reader.read_unit(unit):
        text = cleaner(doc.text, doc.metadata)
        if text is not None:
            doc.text = text
            if cfg.near_dedup:
                doc.minhash = minhash(text)
            yield doc


def cleaned_documents(cfg: IngestConfig, counts: Counter, spill_parent: Path, progress=None) -> Iterator[Document]:
    """Every document of the sources that cleaning keeps, in input order; what reading and cleaning
    counted is added to `counts` once the last one is out, and `progress(unit, waited_s)` is called
    as each unit's documents are all out, with the seconds spent waiting for its task (0 in
    process). Close it when leaving early: that stops the workers and removes their spill files
    (under `spill_parent`)."""
    units = source_units(cfg.sources)
    log.info("ingest: reading and cleaning %s", describe(cfg.workers, cfg.cluster, len(units)))
    report = progress or (lambda unit, waited_s: None)
    if in_process(cfg.workers, cfg.cluster, len(units)):  # no start-up cost, as for a single file
        reader, cleaner = make_reader(cfg), Cleaner(cfg)
        for unit in units:
            yield from clean_unit(cfg, reader, cleaner, unit)
            report(unit, 0.0)
        counts.update(_task_counts(reader, cleaner))
        return
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=spill_parent) as spill_dir:
        tasks = [(cfg, unit, Path(spill_dir) / f"{n:06d}.arrow") for n, unit in enumerate(units)]
        # closed before the spill directory goes: no task still writes into it
        with closing(ordered_results(_clean_to_spill, tasks, cfg.workers, cfg.cluster)) as results:
            for _, unit, spill in tasks:
                asked = time.perf_counter()
                task_counts, task_log = next(results)
                waited_s = time.perf_counter() - asked
                for level, message in task_log:
                    log.log(level, "%s", message)
                counts.update(task_counts)
                yield from read_spill(spill)
                spill.unlink()
                report(unit, waited_s)


class _LogLines(logging.Handler):
    """A worker's log records, kept to be logged again by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def _clean_to_spill(task: tuple[IngestConfig, SourceUnit, Path]) -> tuple[Counter, list[tuple[int, str]]]:
    """A worker's task: the unit's kept documents into the spill file; what it counted and logged.

    The file appears whole or not at all (`atomic_file`): a task run again after its worker was
    lost never meets a half-written file of the first run."""
    cfg, unit, spill = task
    reader, cleaner, log_lines = make_reader(cfg), Cleaner(cfg), _LogLines()
    log.addHandler(log_lines)
    try:
        with atomic_file(spill) as tmp, SpillWriter(tmp) as writer:
            for doc in clean_unit(cfg, reader, cleaner, unit):
                writer.add(doc)
    finally:
        log.removeHandler(log_lines)
    return _task_counts(reader, cleaner), log_lines.lines


def _task_counts(reader: Reader, cleaner: Cleaner) -> Counter:
    counts: Counter = Counter()
    counts.update(reader.counts)  # update, not +: a count of 0 is kept, so the manifest names every step
    counts.update(cleaner.counts)
    return counts
