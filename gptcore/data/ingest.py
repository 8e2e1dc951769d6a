"""Ingest: stream the sources, clean and filter, drop duplicates, split by document or group, write the splits.

Output (written to a temporary directory, then renamed into place):
    OUT/train.parquet, OUT/val.parquet, OUT/test.parquet   columns: id, text, source, <metadata>
    OUT/manifest.json    per split: documents, bytes, digest; every source file with its sha256;
                         what each cleaning step counted; the corpus digest; the input fingerprint

Memory stays bounded: documents stream from the readers (in worker processes, a file each:
`gptcore.data.reading`, back in input order) to row groups of the Parquet writers, and the
exact-duplicate index costs 8 bytes a document. A document lands in a split by a hash
of its id alone (of its group's value, with `group_field`: a group is never in two splits), so
its split depends neither on the order of the sources nor on the rest of the corpus.
Re-running on unchanged inputs, config and code does no work (`fingerprint`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptcore.config import IngestConfig
from gptcore.data.dedup import ExactDedup, NearDedup
from gptcore.data.files import SourceUnit, source_units, unit_bytes
from gptcore.data.lineage import fingerprint, output_config, source_digests, up_to_date
from gptcore.data.reading import cleaned_documents, record_fields
from gptcore.data.sources import SHAKESPEARE_FIELDS, Document
from gptcore.errors import InputError
from gptcore.fsutil import atomic_dir, write_json
from gptcore.layout import INGEST_MANIFEST, SPLITS
from gptcore.results import IngestResult, load_ingest
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.data")

_ROW_GROUP_BYTES = 8 << 20
_PROGRESS_EVERY_S = 10.0


def split_key(value: str) -> int:
    """A document's place in [0, 2^64), from its id (or its group's value) alone."""
    return int.from_bytes(hashlib.sha256(value.encode("utf-8")).digest()[:8], "big")


def group_value(doc: Document, group_field: str) -> str:
    """The value naming the document's group: its source's name for `source`, else the record field's."""
    value = doc.source_name if group_field == "source" else doc.metadata.get(group_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(
            f"{doc.source}: document {doc.id!r} has no value for {group_field!r} (ingest.group_field); "
            "every document needs its group, or documents of one group could land in two splits"
        )
    return str(value)


class SplitAssigner:
    """Assigns each document to train, val or test by its key: a hash of its id, or of its group's
    value with `group_field`, so every document of a group shares one key and one split.

    A small corpus (up to SMALL_CORPUS documents and bytes, held in memory) gets exact
    fractions of its groups (by default, each document its own) by rank of key, at least one in
    each split. Past that the documents stream: val below val_fraction of the key range, test
    below val + test, train above, so a document's split depends on its key alone.
    """

    SMALL_CORPUS = (1000, 64 << 20)

    def __init__(self, val_fraction: float, test_fraction: float, group_field: str | None = None):
        self.val_fraction, self.test_fraction, self.group_field = val_fraction, test_fraction, group_field
        self.val_below = int(val_fraction * 2**64)
        self.test_below = int((val_fraction + test_fraction) * 2**64)
        self.buffer: list[tuple[int, Document]] | None = []
        self.buffer_bytes = 0

    def key(self, doc: Document) -> int:
        return split_key(doc.id if self.group_field is None else group_value(doc, self.group_field))

    def by_threshold(self, key: int, doc: Document) -> tuple[str, Document]:
        return ("val" if key < self.val_below else "test" if key < self.test_below else "train"), doc

    def assign(self, doc: Document) -> list[tuple[str, Document]]:
        """The (split, document) pairs to write now."""
        key = self.key(doc)
        if self.buffer is None:
            return [self.by_threshold(key, doc)]
        self.buffer.append((key, doc))
        self.buffer_bytes += len(doc.text)
        if len(self.buffer) <= self.SMALL_CORPUS[0] and self.buffer_bytes <= self.SMALL_CORPUS[1]:
            return []
        held, self.buffer = self.buffer, None  # a large corpus: stream from here on
        return [self.by_threshold(k, d) for k, d in held]

    def finish(self) -> list[tuple[str, Document]]:
        """What a small corpus held back: its groups' keys ranked, the first for val, then test, then train."""
        if self.buffer is None:
            return []
        keys = sorted({key for key, _ in self.buffer})
        units = "document" if self.group_field is None else "group"
        of_field = "" if self.group_field is None else f" of {self.group_field!r}"
        if len(keys) < 3:
            raise InputError(
                f"the corpus has {len(keys)} {units}(s){of_field} after cleaning; train/val/test needs at least 3"
            )
        n_val = max(1, round(len(keys) * self.val_fraction))
        n_test = max(1, round(len(keys) * self.test_fraction))
        if n_val + n_test >= len(keys):
            raise InputError(
                f"the corpus has {len(keys)} {units}s{of_field}: val_fraction={self.val_fraction} and "
                f"test_fraction={self.test_fraction} hold out {n_val} + {n_test}, leaving none for train"
            )
        split_of = {
            key: "val" if i < n_val else "test" if i < n_val + n_test else "train" for i, key in enumerate(keys)
        }
        return sorted(((split_of[key], doc) for key, doc in self.buffer), key=lambda pair: pair[1].id)


class MetadataTypes:
    """One type per metadata column (ints and floats mix); Parquet cannot store `1` beside `"a"`."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.first: dict[str, tuple[type, str]] = {}

    def check(self, doc: Document) -> None:
        for column in self.columns:
            value = doc.metadata.get(column)
            if value is None:
                continue
            kind = float if type(value) is int else type(value)
            if column not in self.first:
                self.first[column] = (kind, doc.id)
            elif kind is not self.first[column][0]:
                first_kind, first_id = self.first[column]
                raise InputError(
                    f"{doc.id}: field {column!r} is {type(value).__name__} ({value!r}) but in {first_id} "
                    f"it is {first_kind.__name__ if first_kind is not float else 'a number'}; "
                    "a metadata field needs one type in every record"
                )


class SplitWriter:
    """One split's Parquet file, written a row group at a time, with its counts and digest.

    The digest sums a hash of every (id, text): it names the split's content whatever the
    order the documents arrived in.
    """

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, ["id", "text", "source", *columns]
        self.rows: dict[str, list] = {c: [] for c in self.columns}
        self.pending_bytes, self.documents, self.bytes, self.sum = 0, 0, 0, 0
        self.writer = None

    def add(self, doc: Document) -> None:
        for c, v in zip(self.columns, (doc.id, doc.text, doc.source)):
            self.rows[c].append(v)
        for c in self.columns[3:]:
            self.rows[c].append(doc.metadata.get(c))
        text = doc.text.encode("utf-8")
        self.documents += 1
        self.bytes += len(text)
        self.pending_bytes += len(text)
        self.sum += int.from_bytes(hashlib.sha256(doc.id.encode("utf-8") + b"\0" + text).digest(), "big")
        if self.pending_bytes >= _ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pydict(self.rows)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        try:
            self.writer.write_table(table.cast(self.writer.schema))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise InputError(f"{self.rows['id'][0]}…: a metadata column changed type within the corpus ({e})") from None
        self.rows = {c: [] for c in self.columns}
        self.pending_bytes = 0

    def close(self) -> dict[str, Any]:
        if self.rows["id"] or self.writer is None:
            self.flush()
        self.writer.close()
        digest = hashlib.sha256((self.sum % 2**256).to_bytes(32, "big")).hexdigest()
        return {"documents": self.documents, "bytes": self.bytes, "digest": digest}


def metadata_columns(cfg: IngestConfig) -> list[str]:
    return sorted(set(record_fields(cfg)) | (set(SHAKESPEARE_FIELDS) if "shakespeare" in cfg.sources else set()))


class Progress:
    """A log line every few seconds, wherever the tasks run: documents kept by cleaning, their
    characters, the sources' bytes done (a unit counts once all its documents are out), the rate
    and the ETA. The log reaches the Prefect run; the totals, MLflow."""

    def __init__(self, units: list[SourceUnit]):
        self.start, self.last = time.perf_counter(), 0.0
        self.documents = self.chars = self.units_done = self.bytes_done = 0
        self.waited_s = 0.0  # this process idle, its next unit's task not done: the workers are the bottleneck
        self.units = len(units)
        sizes = [unit_bytes(u) for u in units]
        self.total_bytes = None if None in sizes else sum(sizes)

    def add(self, n_chars: int) -> None:
        self.documents += 1
        self.chars += n_chars
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            self.log(now)

    def unit_done(self, unit: SourceUnit, waited_s: float) -> None:
        self.units_done += 1
        self.bytes_done += unit_bytes(unit) or 0
        self.waited_s += waited_s

    def log(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"ingest: {self.documents} documents, {self.chars / 1e6:.1f}M characters read and cleaned "
            f"({self.chars / 1e6 / elapsed:.1f}M/s); {self.units_done}/{self.units} source units"
        )
        if self.total_bytes:
            rate = self.bytes_done / elapsed
            eta = f"{(self.total_bytes - self.bytes_done) / rate:.0f}s" if rate else "?"
            line += (
                f", {self.bytes_done / 1e6:.0f}/{self.total_bytes / 1e6:.0f} MB of sources, "
                f"{rate / 1e6:.1f} MB/s, ETA {eta}"
            )
        log.info("%s", line)


def stream_splits(cfg: IngestConfig, tmp: Path, counts: Counter, progress: Progress) -> dict[str, dict[str, Any]]:
    """Read, clean, dedup and split every document into tmp/{split}.parquet; return per-split stats."""
    exact, near = ExactDedup(), NearDedup(cfg.near_dedup_threshold) if cfg.near_dedup else None
    columns = metadata_columns(cfg)
    types = MetadataTypes(columns)
    assigner = SplitAssigner(cfg.val_fraction, cfg.test_fraction, cfg.group_field)
    writers = {s: SplitWriter(tmp / f"{s}.parquet", columns) for s in SPLITS}
    with closing(cleaned_documents(cfg, counts, tmp, progress.unit_done)) as documents:
        for doc in documents:
            progress.add(len(doc.text))
            if cfg.dedup and exact.seen(doc.text):
                counts["dropped_duplicate"] += 1
                continue
            if near is not None and near.seen(doc.minhash):
                counts["dropped_near_duplicate"] += 1
                continue
            types.check(doc)
            for split, d in assigner.assign(doc):
                writers[split].add(d)
    if assigner.buffer == []:
        raise InputError(f"the corpus is empty: sources {cfg.sources} yielded no non-empty documents")
    for split, d in assigner.finish():
        writers[split].add(d)
    for split, writer in writers.items():
        if writer.documents == 0:
            fix = (
                "lower ingest.val_fraction and ingest.test_fraction"
                if split == "train"
                else f"raise ingest.{split}_fraction"
            )
            hashed = "document's id" if cfg.group_field is None else f"{cfg.group_field!r} group"
            raise InputError(f"the {split} split is empty: no {hashed} hashed into it; {fix}")
    log.info(
        "ingest: read and cleaned %d documents (%.1fM characters) in %.1fs, %.1fs of it waiting for the "
        "workers (the rest: dedup, split and writing, in this process)",
        progress.documents,
        progress.chars / 1e6,
        time.perf_counter() - progress.start,
        progress.waited_s,
    )
    return {s: w.close() for s, w in writers.items()}


def ingest(cfg: IngestConfig, out_dir: str | Path, tracking: Tracking | None = None) -> IngestResult:
    """Read, clean and split the corpus of `cfg` into `out_dir`; log counts and the manifest."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    modules = ("reading", "executor", "spill", "files", "sources", "filters", "dedup")
    code = [__name__] + [f"gptcore.data.{name}" for name in modules]
    key = fingerprint(cfg.sources, output_config(cfg), code)
    if up_to_date(out_dir / INGEST_MANIFEST, key, [f"{s}.parquet" for s in SPLITS]):
        result = load_ingest(out_dir)
        log.info("ingest: sources, config and code unchanged since %s was written: nothing to do", out_dir)
        with stage_run(tracking, "ingest", tags={"gptcore.data_digest": result.digest, "gptcore.cached": True}) as run:
            run.log_dataset(result.manifest_path, result.digest)
        return result
    with stage_run(tracking, "ingest") as run:
        run.log_params(asdict(cfg))
        counts: Counter[str] = Counter()
        with atomic_dir(out_dir) as tmp:
            progress = Progress(source_units(cfg.sources))
            splits = stream_splits(cfg, tmp, counts, progress)
            manifest = {
                "sources": source_digests(cfg.sources),
                "columns": ["id", "text", "source", *metadata_columns(cfg)],
                "dropped": {
                    k.removeprefix("dropped_"): v for k, v in sorted(counts.items()) if k.startswith("dropped_")
                },
                "counts": dict(sorted(counts.items())),
                "splits": splits,
                "digest": hashlib.sha256("".join(splits[s]["digest"] for s in SPLITS).encode()).hexdigest(),
                "fingerprint": key,
                "config": output_config(cfg),
            }
            write_json(tmp / INGEST_MANIFEST, manifest)
        result = load_ingest(out_dir)
        run.set_tags({"gptcore.data_digest": result.digest})
        run.log_metrics(
            {f"documents/{s}": n for s, n in result.documents.items()}
            | {f"bytes/{s}": n for s, n in result.bytes.items()}
            | {f"ingest/{k}": n for k, n in counts.items()}
            | {"ingest/seconds": time.perf_counter() - start, "ingest/waited_for_workers_s": progress.waited_s}
            | {"ingest/mb_per_s": sum(result.bytes.values()) / 1e6 / (time.perf_counter() - start)}
        )
        run.log_dataset(result.manifest_path, result.digest)
    log.info(
        "ingest: %s documents (%s bytes) -> %s in %.1fs; dropped %s; digest %s",
        result.documents,
        result.bytes,
        out_dir,
        time.perf_counter() - start,
        manifest["dropped"],
        result.digest[:12],
    )
    return result
