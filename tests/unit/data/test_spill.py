"""Spill files: what a worker kept reads back in the parent exactly as written, and without pickle."""

import datetime
import decimal
import hashlib
import json
from dataclasses import replace

import pytest

from gptcore.config import IngestConfig
from gptcore.data import spill
from gptcore.data.ingest import ingest
from gptcore.data.sources import Document
from gptcore.errors import InputError
from gptcore.layout import INGEST_MANIFEST, SPLITS

# values a record may hold, mixed in one field: Arrow alone would read `1` beside `2.5` back as `1.0`
VALUES = [1, 2.5, None, "x", True, [1, 2.5], {"a": 1}, datetime.datetime(2020, 1, 1), decimal.Decimal("1.5")]
VALUES += [b"\0", 2**70, float("nan"), -0.0, "\ud800"]


def documents() -> list[Document]:
    docs = [
        Document(f"f.jsonl:{i}", f"text {i} \ud800", "src/f.jsonl", {"v": v, "n": i}, "f.jsonl")
        for i, v in enumerate(VALUES * 3)
    ]
    return [*docs, Document("plain", "no metadata", "src/g.txt", {}, "g.txt")]


def same(a: Document, b: Document) -> bool:
    fields = ("id", "text", "source", "source_name")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and spill._same(a.metadata, b.metadata)


@pytest.mark.parametrize("batch_bytes", [spill.BATCH_BYTES, 1, 40])
def test_documents_read_back_as_written(tmp_path, monkeypatch, batch_bytes):
    monkeypatch.setattr(spill, "BATCH_BYTES", batch_bytes)
    path, docs = tmp_path / "0.arrow", documents()
    with spill.SpillWriter(path) as writer:
        for doc in docs:
            writer.add(doc)
    back = list(spill.read_spill(path))
    assert len(back) == len(docs) and all(map(same, docs, back))
    assert path.read_bytes()[:4] == b"\xff\xff\xff\xff"  # an Arrow IPC stream begins so; a pickle does not


def test_a_value_neither_arrow_nor_json_holds_is_an_error(tmp_path):
    with pytest.raises(InputError, match="'v' holds"), spill.SpillWriter(tmp_path / "0.arrow") as writer:
        writer.add(Document("x", "text", "src", {"v": object()}, "x"))
        writer.flush()


def test_numbers_of_mixed_types_give_the_same_bytes_for_one_worker_and_two(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in range(2):  # `score` 1 beside 2.5 in each file: an int must not come back a float
        records = [{"text": f"file {f}, record {i}.", "score": i if i % 2 else i + 0.5} for i in range(20)]
        (src / f"{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = IngestConfig(sources=[str(src)], group_field="score", workers=1)  # grouped by str(score): "1" or "1.0"
    ingest(cfg, tmp_path / "one", tracking=None)
    ingest(replace(cfg, workers=2), tmp_path / "two", tracking=None)
    for name in [f"{s}.parquet" for s in SPLITS] + [INGEST_MANIFEST]:
        one, two = (hashlib.sha256((tmp_path / out / name).read_bytes()).hexdigest() for out in ("one", "two"))
        assert one == two, name
