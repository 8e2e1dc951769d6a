"""Ingest: read the sources, normalise, drop exact duplicates, split by document, write the splits.

Output (written to a temporary directory, then renamed into place):
    OUT/train.parquet, OUT/val.parquet, OUT/test.parquet   columns: id, text, source, <metadata>
    OUT/manifest.json    per split: documents, bytes, digest; the corpus digest; what was dropped

A document lands in a split by a hash of its id, so the split does not depend on the order of
the sources and no document (for Shakespeare: no scene) is in two splits.
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from gptcore.config import IngestConfig
from gptcore.data.sources import Document, read_sources
from gptcore.errors import InputError
from gptcore.fsutil import atomic_dir, read_stage_output, write_json
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.data")

SPLITS = ("train", "val", "test")


@dataclass
class IngestResult:
    out_dir: str
    manifest_path: str
    digest: str
    documents: dict[str, int]
    bytes: dict[str, int]

    def split_path(self, split: str) -> Path:
        return Path(self.out_dir) / f"{split}.parquet"


def normalise(text: str) -> str:
    """Unicode NFC and `\\n` line endings, so equal texts compare and tokenize equal."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def split_key(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def assign_splits(docs: list[Document], val_fraction: float, test_fraction: float) -> dict[str, list[Document]]:
    """Deterministic document-level split: the lowest hash keys go to val, the next to test."""
    if len(docs) < 3:
        raise InputError(f"the corpus has {len(docs)} document(s) after cleaning; train/val/test needs at least 3")
    ordered = sorted(docs, key=lambda d: split_key(d.id))
    n_val = max(1, round(len(docs) * val_fraction))
    n_test = max(1, round(len(docs) * test_fraction))
    if n_val + n_test >= len(docs):
        raise InputError(f"the corpus has {len(docs)} documents: val_fraction={val_fraction} and "
                         f"test_fraction={test_fraction} hold out {n_val} + {n_test}, leaving none for train")
    val, test, train = ordered[:n_val], ordered[n_val : n_val + n_test], ordered[n_val + n_test :]
    return {"train": sorted(train, key=lambda d: d.id), "val": sorted(val, key=lambda d: d.id),
            "test": sorted(test, key=lambda d: d.id)}


def collect_documents(cfg: IngestConfig) -> tuple[list[Document], dict[str, int]]:
    docs: list[Document] = []
    seen: set[str] = set()
    dropped = {"empty": 0, "duplicate": 0}
    for doc in read_sources(cfg.sources, cfg.text_field, cfg.metadata_fields):
        doc.text = normalise(doc.text)
        if not doc.text.strip():
            dropped["empty"] += 1
            continue
        digest = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
        if cfg.dedup and digest in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(digest)
        docs.append(doc)
    if not docs:
        raise InputError(f"the corpus is empty: sources {cfg.sources} yielded no non-empty documents")
    return docs, dropped


def check_metadata_types(docs: list[Document], columns: list[str]) -> None:
    """A metadata column holds one type (ints and floats mix); Parquet cannot store `1` beside `"a"`."""
    for column in columns:
        first: tuple[type, str] | None = None
        for d in docs:
            value = d.metadata.get(column)
            if value is None:
                continue
            kind = float if type(value) is int else type(value)
            if first is None:
                first = (kind, d.id)
            elif kind is not first[0]:
                raise InputError(f"{d.id}: field {column!r} is {type(value).__name__} ({value!r}) but in {first[1]} "
                                 f"it is {first[0].__name__ if first[0] is not float else 'a number'}; "
                                 "a metadata field needs one type in every record")


def _rows(docs: list[Document], columns: list[str]) -> dict[str, list]:
    rows: dict[str, list] = {c: [] for c in ["id", "text", "source", *columns]}
    for d in docs:
        rows["id"].append(d.id)
        rows["text"].append(d.text)
        rows["source"].append(d.source)
        for c in columns:
            rows[c].append(d.metadata.get(c))
    return rows


def split_digest(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode("utf-8") + b"\0" + hashlib.sha256(d.text.encode("utf-8")).digest())
    return h.hexdigest()


def ingest(cfg: IngestConfig, out_dir: str | Path, tracking: Tracking | None = None) -> IngestResult:
    """Read, clean and split the corpus of `cfg` into `out_dir`; log counts and the manifest."""
    import datasets

    datasets.disable_progress_bars()  # its bar per tiny Parquet write is noise; this stage logs counts
    start = time.perf_counter()
    out_dir = Path(out_dir)
    with stage_run(tracking, "ingest") as run:
        run.log_params(asdict(cfg))
        docs, dropped = collect_documents(cfg)
        splits = assign_splits(docs, cfg.val_fraction, cfg.test_fraction)
        columns = sorted({k for d in docs for k in d.metadata})
        check_metadata_types(docs, columns)
        manifest = {"sources": cfg.sources, "columns": ["id", "text", "source", *columns],
                    "dropped": dropped, "splits": {}}
        with atomic_dir(out_dir) as tmp:
            for split, split_docs in splits.items():
                datasets.Dataset.from_dict(_rows(split_docs, columns)).to_parquet(str(tmp / f"{split}.parquet"))
                manifest["splits"][split] = {
                    "documents": len(split_docs),
                    "bytes": sum(len(d.text.encode("utf-8")) for d in split_docs),
                    "digest": split_digest(split_docs),
                }
            manifest["digest"] = hashlib.sha256(
                "".join(manifest["splits"][s]["digest"] for s in SPLITS).encode()
            ).hexdigest()
            write_json(tmp / "manifest.json", manifest)
        result = IngestResult(
            out_dir=str(out_dir),
            manifest_path=str(out_dir / "manifest.json"),
            digest=manifest["digest"],
            documents={s: manifest["splits"][s]["documents"] for s in SPLITS},
            bytes={s: manifest["splits"][s]["bytes"] for s in SPLITS},
        )
        run.set_tags({"gptcore.data_digest": result.digest})
        run.log_metrics({f"{s}_documents": n for s, n in result.documents.items()}
                        | {f"{s}_bytes": n for s, n in result.bytes.items()}
                        | {f"dropped_{k}": v for k, v in dropped.items()})
        run.log_artifact(result.manifest_path)
    log.info("ingest: %s documents (%s bytes) -> %s in %.1fs; dropped %s; digest %s",
             result.documents, result.bytes, out_dir, time.perf_counter() - start, dropped, result.digest[:12])
    return result


def load_ingest(out_dir: str | Path) -> IngestResult:
    """The result of an earlier `ingest` into `out_dir`, from its manifest."""
    m = read_stage_output(out_dir, "manifest.json", "ingested corpus", "ingest")
    return IngestResult(str(out_dir), str(Path(out_dir) / "manifest.json"), m["digest"],
                        {s: m["splits"][s]["documents"] for s in SPLITS}, {s: m["splits"][s]["bytes"] for s in SPLITS})


def read_split(out_dir: str | Path, split: str, columns: list[str] | None = None):
    """One split as a pyarrow Table (no Hugging Face cache copy)."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / f"{split}.parquet"
    if not path.is_file():
        raise InputError(f"{path}: split {split!r} not found; run `gptcore ingest` first")
    if columns:
        available = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns if c not in available]
        if missing:
            raise InputError(f"{path}: no column(s) {missing} (columns: {available})")
    return pq.read_table(path, columns=columns)
