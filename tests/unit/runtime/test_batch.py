"""Chunked, resumable batch scoring of files (`gptcore.runtime.batch`) in real ONNX Runtime sessions."""

import json
import logging
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptcore.errors import InputError
from gptcore.runtime import load_model, score_file
from gptcore.runtime.batch import parts_dir
from tests.conftest import input_file, topic_texts


class Interrupted(Exception):
    pass


def stop_after(index: int):
    def on_chunk(i: int) -> None:
        if i == index:
            raise Interrupted

    return on_chunk


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_interrupted_run_resumes_with_finished_chunks_skipped(onnx_classifier, tmp_path, suffix, caplog):
    src = input_file(tmp_path, suffix)
    whole = score_file(onnx_classifier, src, tmp_path / "whole.parquet", chunk_rows=8)
    assert (whole.rows, whole.chunks, whole.chunks_skipped) == (45, 6, 0)

    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=stop_after(2))
    assert not out.exists()  # never half-written
    assert sorted(p.name for p in parts_dir(out).glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]

    scored_now = []
    with caplog.at_level(logging.INFO, logger="gptcore"):
        resumed = score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=scored_now.append)
    assert (resumed.rows, resumed.chunks, resumed.chunks_skipped) == (45, 6, 3)
    assert scored_now == [3, 4, 5]
    assert "resuming: 3 chunks of 8 rows" in caplog.text
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))
    assert not parts_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "whole.parquet", "out.parquet"])


@pytest.mark.parametrize(
    "suffix,first", [(".parquet", r"score: 8/45 rows \(18%\)"), (".jsonl", r"score: 8/~4\d rows \(1\d%\)")]
)
def test_progress_lines_give_rows_done_of_the_total_rate_and_eta(
    onnx_classifier, tmp_path, monkeypatch, caplog, suffix, first
):
    import re

    import gptcore.runtime.batch as scoring

    monkeypatch.setattr(scoring, "PROGRESS_SECONDS", 0.0)  # a line after every chunk, not every 10 s
    with caplog.at_level(logging.INFO, logger="gptcore"):
        score_file(onnx_classifier, input_file(tmp_path, suffix), tmp_path / "out.parquet", chunk_rows=8)
    lines = [r.getMessage() for r in caplog.records if "rows/s" in r.getMessage()]
    assert len(lines) == 7  # six chunks and the end (the total is estimated from bytes read for JSONL)
    assert re.match(first + r" \| [\d.]+ rows/s \| ETA \d+s$", lines[0]), lines[0]
    assert lines[-1].startswith("score: 45/45 rows (100%)")


def test_changed_input_model_or_chunking_starts_over(onnx_classifier, classifier_package, tmp_path, caplog):
    src, out = input_file(tmp_path, ".jsonl"), tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=stop_after(1))

    # One text changed, same size, same mtime: only the content digest can tell.
    stat = src.stat()
    src.write_bytes(src.read_bytes().replace(b"wave", b"hill", 1))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    with pytest.raises(Interrupted), caplog.at_level(logging.INFO, logger="gptcore"):
        score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=stop_after(1))
    assert "(input_sha256 changed): starting over" in caplog.text

    other = shutil.copytree(classifier_package.package_dir, tmp_path / "other")
    meta = json.loads((other / "gptcore_model.json").read_text())
    (other / "gptcore_model.json").write_text(
        json.dumps(meta, indent=1)
    )  # same onnx_classifier, other bytes: other identity
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptcore"):
        result = score_file(load_model(other, device="cpu", threads=1), src, out, chunk_rows=8)
    assert "(model_digest changed): starting over" in caplog.text
    assert result.chunks_skipped == 0

    fresh = score_file(onnx_classifier, src, tmp_path / "fresh.parquet", chunk_rows=8)
    assert pq.read_table(out).equals(pq.read_table(fresh.output_path))
    assert pq.read_table(out).column("text").to_pylist() != topic_texts(45)  # the changed text was scored

    with pytest.raises(Interrupted):
        score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=stop_after(1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptcore"):
        assert score_file(onnx_classifier, src, out, chunk_rows=10).chunks_skipped == 0
    assert "(chunk_rows changed): starting over" in caplog.text


def test_jsonl_chunks_typed_apart_join_and_errors_name_the_row(onnx_classifier, tmp_path):
    src = tmp_path / "in.jsonl"
    texts = topic_texts(20)
    # `note` is null throughout the first chunk and text later: a streaming reader that fixes
    # the types from its first block would fail here.
    src.write_text(
        "".join(json.dumps({"text": t, "note": None if i < 8 else f"n{i}"}) + "\n" for i, t in enumerate(texts))
    )
    scored = pq.read_table(score_file(onnx_classifier, src, tmp_path / "out.parquet", chunk_rows=8).output_path)
    assert scored.schema.field("note").type == pa.string()
    assert scored.column("note").to_pylist() == [None] * 8 + [f"n{i}" for i in range(8, 20)]
    assert scored.column("token_count").to_pylist() == [len(ids) for ids in onnx_classifier.token_ids(texts)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": None if i == 19 else t}) + "\n" for i, t in enumerate(texts)))
    with pytest.raises(InputError, match=r"bad\.jsonl: row 19 \(counting from 0\): column 'text' is null"):
        score_file(onnx_classifier, bad, tmp_path / "bad.parquet", chunk_rows=8)
    assert not (tmp_path / "bad.parquet").exists()
