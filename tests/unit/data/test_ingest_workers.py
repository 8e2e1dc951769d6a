"""`ingest.workers`: files read and cleaned in worker processes give the same bytes as in process."""

import hashlib
import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from gptcore.config import IngestConfig
from gptcore.data import executor
from gptcore.data import ingest as ingest_module
from gptcore.data.files import source_units
from gptcore.data.ingest import ingest
from gptcore.data.sources import Reader
from gptcore.errors import ConfigError, InputError
from gptcore.layout import INGEST_MANIFEST, SPLITS


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_corpus(src: Path) -> None:
    """Files of every kind, with texts repeated across files: which copy dedup keeps depends on the order."""
    src.mkdir()
    for f in range(4):
        records = [
            {"text": f"file {f}, line {i}: mail me at x{i}@example.com.\n", "topic": f"t{i % 3}"} for i in range(30)
        ]
        records += [{"text": f"shared line {i}, the same in every file.\n", "topic": "shared"} for i in range(5)]
        write_jsonl(src / f"part{f}.jsonl", records)
    texts = [f"parquet row {i}.\n" for i in range(20)] + ["shared line 0, the same in every file.\n"]
    pq.write_table(pa.table({"text": texts, "topic": ["pq"] * len(texts)}), src / "rows.parquet", row_group_size=7)
    pcsv.write_csv(pa.table({"text": [f"csv row {i}.\n" for i in range(10)], "topic": ["csv"] * 10}), src / "rows.csv")


def file_digests(out_dir: Path) -> dict[str, str]:
    names = [f"{s}.parquet" for s in SPLITS] + [INGEST_MANIFEST]
    return {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest() for name in names}


@pytest.fixture
def pool_tasks(monkeypatch) -> list:
    """The units the parent handed to worker processes."""
    tasks = []

    class CountingPool(ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            tasks.append(args[0][1])  # (config, unit, spill file)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(executor, "ProcessPoolExecutor", CountingPool)
    return tasks


def test_splits_are_the_same_bytes_for_one_worker_and_two(tmp_path, monkeypatch, pool_tasks, caplog):
    # Streamed past 5 documents, rows are written in the order they arrive, not sorted by id.
    monkeypatch.setattr(ingest_module.SplitAssigner, "SMALL_CORPUS", (5, 1 << 20))
    make_corpus(tmp_path / "src")
    cfg = IngestConfig(
        sources=[str(tmp_path / "src")], metadata_fields=["topic"], val_fraction=0.2, test_fraction=0.2, workers=1
    )
    one = ingest(cfg, tmp_path / "one", tracking=None)
    assert pool_tasks == []
    two = ingest(replace(cfg, workers=2), tmp_path / "two", tracking=None)
    assert len(pool_tasks) == 8  # every file a task in a worker process, the Parquet file's 3 row groups 3 tasks
    assert file_digests(tmp_path / "one") == file_digests(tmp_path / "two")
    assert one.digest == two.digest
    manifest = json.loads((tmp_path / "two" / INGEST_MANIFEST).read_text(encoding="utf-8"))
    assert manifest["counts"]["dropped_duplicate"] == 16  # 5 shared lines x 3 later files, and the parquet copy
    assert manifest["counts"]["pii_email"] == 120
    assert sum(two.documents.values()) == 4 * 30 + 5 + 20 + 10
    assert not list(tmp_path.glob("**/.spill-*"))
    with caplog.at_level(logging.INFO, logger="gptcore.data"):  # another worker count: the same output, no work
        ingest(cfg, tmp_path / "two", tracking=None)
    assert "nothing to do" in caplog.text


def test_a_parquet_file_read_a_row_group_a_task_gives_the_documents_of_the_whole_file(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), path, row_group_size=4)
    units = source_units([str(path)])
    assert [u.row_group for u in units] == [0, 1, 2]
    by_group = [(d.id, d.text) for unit in units for d in Reader().read_unit(unit)]
    assert by_group == [(d.id, d.text) for d in Reader().read_file(path)]
    assert by_group == [(f"rows.parquet:{i}", f"row {i}") for i in range(10)]  # rows numbered across the groups


def test_an_error_in_a_worker_names_its_file_and_leaves_nothing(tmp_path, pool_tasks):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": f"good {i}\n"} for i in range(5)])
    (src / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\nnot json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"b\.jsonl:2: not valid JSON"):
        ingest(IngestConfig(sources=[str(src)], workers=2), tmp_path / "work" / "data", tracking=None)
    assert len(pool_tasks) == 2
    assert list((tmp_path / "work").iterdir()) == []  # no output, no spill files


def test_what_a_worker_warns_reaches_the_parents_log(tmp_path, pool_tasks, caplog):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": f"short {i}\n"} for i in range(5)])
    write_jsonl(src / "b.jsonl", [{"text": "fine"}, {"text": "x" * 3000}, {"text": "also fine"}])
    with caplog.at_level(logging.WARNING, logger="gptcore.data"):
        ingest(IngestConfig(sources=[str(src)], workers=2, max_document_bytes=100), tmp_path / "out")
    assert len(pool_tasks) == 2
    assert re.search(r"b\.jsonl:2: a \d+-byte record exceeds max_document_bytes=100: skipped", caplog.text)
    manifest = json.loads((tmp_path / "out" / INGEST_MANIFEST).read_text(encoding="utf-8"))
    assert manifest["counts"]["skipped_too_long"] == 1


def test_negative_workers_are_refused():
    with pytest.raises(ConfigError, match=r"^workers: must be >= 0"):
        IngestConfig(workers=-1)
