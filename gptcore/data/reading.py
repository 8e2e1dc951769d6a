"""The sources read and cleaned, in worker processes or in this one, the documents in input order.

A task reads and cleans one unit of the sources (`source_units`: a file, a row group of a
Parquet file of several, the Shakespeare corpus, a hub dataset). With more than one worker
(`ingest.workers`) each task runs in a worker process that writes the documents cleaning keeps
to a spill file (Arrow, not pickle: `gptcore.data.spill`), a batch at a time; the parent reads
the spill files back in the order of the units. So what follows (dedup, split, write) sees the
same documents in the same order whatever the worker count, and writes the same bytes. Tasks
run at most two a worker ahead of the parent: memory holds a batch a process, disk the cleaned
text of those tasks, beside the output. What a task logs (a skipped record's warning) is logged
again by the parent, so it reaches the stage's log as it would from one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gptcore.config import IngestConfig
from gptcore.data.files import SourceUnit, source_units
from gptcore.data.filters import Cleaner
from gptcore.data.sources import Document, Reader
from gptcore.data.spill import SpillWriter, read_spill

log = logging.getLogger("gptcore.data")

_TASKS_AHEAD_PER_WORKER = 2  # one running, one waiting: a worker never idles while the parent reads


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


def clean_unit(reader: Reader, cleaner: Cleaner, unit: SourceUnit) -> Iterator[Document]:
    """The documents of one unit that cleaning keeps, their text cleaned."""
    for doc in reader.read_unit(unit):
        text = cleaner(doc.text, doc.metadata)
        if text is not None:
            doc.text = text
            yield doc


def cleaned_documents(cfg: IngestConfig, counts: Counter, spill_parent: Path) -> Iterator[Document]:
    """Every document of the sources that cleaning keeps, in input order; what reading and cleaning
    counted is added to `counts` once the last one is out. Close it when leaving early: that stops
    the workers and removes their spill files (under `spill_parent`)."""
    units = source_units(cfg.sources)
    workers = min(cfg.workers or os.cpu_count() or 1, len(units))
    if workers <= 1:  # in process: no start-up cost, as for a single file
        reader, cleaner = make_reader(cfg), Cleaner(cfg)
        for unit in units:
            yield from clean_unit(reader, cleaner, unit)
        counts.update(_task_counts(reader, cleaner))
        return
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=spill_parent) as spill_dir:
        # spawn, not fork: the parent may hold threads (MLflow, Prefect) that a forked child would inherit stopped.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            tasks: deque = deque()  # (future, spill file) of units i, i + 1, ...
            for i in range(len(units)):
                while len(tasks) < workers * _TASKS_AHEAD_PER_WORKER and i + len(tasks) < len(units):
                    n = i + len(tasks)
                    spill = Path(spill_dir) / f"{n:06d}.arrow"
                    tasks.append((pool.submit(_clean_to_spill, cfg, units[n], spill), spill))
                future, spill = tasks.popleft()
                task_counts, task_log = future.result()
                for level, message in task_log:
                    log.log(level, "%s", message)
                counts.update(task_counts)
                yield from read_spill(spill)
                spill.unlink()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # before the spill directory goes: no task still writes


class _LogLines(logging.Handler):
    """A worker's log records, kept to be logged again by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def _clean_to_spill(cfg: IngestConfig, unit: SourceUnit, spill: Path) -> tuple[Counter, list[tuple[int, str]]]:
    """A worker's task: the unit's kept documents into `spill`; what it counted and logged."""
    reader, cleaner, log_lines = make_reader(cfg), Cleaner(cfg), _LogLines()
    log.addHandler(log_lines)
    try:
        with SpillWriter(spill) as writer:
            for doc in clean_unit(reader, cleaner, unit):
                writer.add(doc)
    finally:
        log.removeHandler(log_lines)
    return _task_counts(reader, cleaner), log_lines.lines


def _task_counts(reader: Reader, cleaner: Cleaner) -> Counter:
    counts: Counter = Counter()
    counts.update(reader.counts)  # update, not +: a count of 0 is kept, so the manifest names every step
    counts.update(cleaner.counts)
    return counts
