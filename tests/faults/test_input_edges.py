"""Input edges, on real files: records over 1 MiB, quoted multi-line CSV texts across read blocks,
truncated compressed files, FIFOs, devices and symlinks leading out of a source, Parquet row
groups too large to hold. Each either reads exactly or fails with an `InputError` naming the file
(and the line or row group), never a silently shorter corpus and never a read that blocks."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gptcore.config import IngestConfig
from gptcore.data.ingest import ingest
from gptcore.data.lineage import source_digests
from gptcore.data.sources import Reader
from gptcore.errors import InputError
from gptcore.runtime.tables import CSV_BLOCK_BYTES, MAX_RECORD_BYTES, TextChunks, read_table


@contextlib.contextmanager
def must_not_block(seconds: int = 20):
    """Fail the test (instead of hanging the suite) if the code under test blocks on a FIFO."""

    def timeout(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def multiline_texts(n: int) -> list[str]:
    return [f'line one of {i}\nline two, "quoted", with a comma\n\nend of {i}' for i in range(n)]


def write_csv(path: Path, texts: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(texts))
    return path


# --- JSONL scoring input: records over 1 MiB ------------------------------------------------


def test_jsonl_scoring_input_reads_records_over_one_mib(tmp_path):
    # pyarrow's JSON reader fails on a record longer than its 1 MiB block unless told otherwise
    texts = ["short", "x" * (3 << 20), "after", "y" * ((1 << 20) + 7)]
    path = write_jsonl(tmp_path / "big.jsonl", texts)
    chunks = list(TextChunks(path, "text", 2))
    assert [c.num_rows for c in chunks] == [2, 2]
    assert [t for c in chunks for t in c.column("text").to_pylist()] == texts


def test_jsonl_scoring_input_refuses_a_record_over_the_bound_naming_its_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n")
        f.write(json.dumps({"text": "z" * (MAX_RECORD_BYTES + 10)}) + "\n")
    with pytest.raises(InputError, match=rf"{path}: line 2: a record longer than 16 MiB"):
        list(TextChunks(path, "text", 10))


# --- quoted multi-line CSV texts across read blocks ------------------------------------------


@pytest.fixture(scope="module")
def multiline_csv(tmp_path_factory) -> tuple[Path, list[str]]:
    """A CSV file larger than pyarrow's read block (16 MiB), every text quoted over four lines."""
    texts = multiline_texts(1)
    per_row = len(texts[0]) + 10
    texts = multiline_texts(CSV_BLOCK_BYTES // per_row + 40_000)
    path = write_csv(tmp_path_factory.mktemp("csv") / "multiline.csv", texts)
    assert path.stat().st_size > CSV_BLOCK_BYTES
    return path, texts


def test_scoring_input_csv_multiline_texts_across_blocks_come_out_exact(multiline_csv):
    path, texts = multiline_csv
    assert read_table(path, "text").column("text").to_pylist() == texts


def test_corpus_csv_multiline_texts_across_blocks_come_out_exact(multiline_csv):
    path, texts = multiline_csv
    reader = Reader(max_document_bytes=1_000_000)  # a 16 MiB block, smaller than the file
    documents = list(reader.read_file(path))
    assert [d.text for d in documents] == texts
    assert documents[-1].id == f"{path.name}:{len(texts) - 1}"


def test_corpus_csv_row_longer_than_the_block_names_file_and_row(tmp_path):
    path = write_csv(tmp_path / "long.csv", ["ok", "w" * (2 * CSV_BLOCK_BYTES + 100), "after"])
    with pytest.raises(InputError, match=rf"{path}: unreadable CSV after row \d+ .*a row longer than the 16 MiB"):
        list(Reader(max_document_bytes=1_000_000).read_file(path))


# --- truncated .gz and .zst ------------------------------------------------------------------


def jsonl_bytes(n: int = 3000) -> bytes:
    return b"".join(json.dumps({"text": f"document {i} " + "words " * 40}).encode() + b"\n" for i in range(n))


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_is_an_input_error_naming_it(tmp_path, suffix):
    data = jsonl_bytes()
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match=rf"{path}:\d+: the compressed data is truncated or corrupt"):
        list(Reader().read_file(path))
    out = tmp_path / "data"
    with pytest.raises(InputError, match=str(path)):
        ingest(IngestConfig(sources=[str(path)], dedup=False), out)
    assert not out.exists()  # no short corpus left behind


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_zst_cut_inside_its_frame_header_is_an_input_error(tmp_path, cut):
    path = tmp_path / "tiny.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(5))[:cut])
    with pytest.raises(InputError, match="truncated"):
        list(Reader().read_file(path))


def test_complete_multi_frame_zst_and_gz_read_every_line(tmp_path):
    data = jsonl_bytes(2000)
    half = data.index(b"\n", len(data) // 2) + 1
    zst = tmp_path / "frames.jsonl.zst"
    compressor = zstandard.ZstdCompressor()
    zst.write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))  # two frames
    gz = tmp_path / "whole.jsonl.gz"
    gz.write_bytes(gzip.compress(data))
    for path in (zst, gz):
        assert len(list(Reader().read_file(path))) == 2000


def test_corrupt_zst_is_an_input_error(tmp_path):
    packed = bytearray(zstandard.ZstdCompressor().compress(jsonl_bytes()))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = b"\xff" * 64
    path = tmp_path / "corrupt.jsonl.zst"
    path.write_bytes(bytes(packed))
    with pytest.raises(InputError, match=rf"{path}:\d+: the compressed data is truncated or corrupt"):
        list(Reader().read_file(path))


# --- FIFOs, devices, symlinks out of a source ------------------------------------------------


def test_fifo_in_a_source_directory_is_refused_without_blocking(tmp_path):
    source = tmp_path / "corpus"
    source.mkdir()
    write_jsonl(source / "a.jsonl", ["one document"])
    os.mkfifo(source / "b.jsonl")  # opening it would wait for a writer forever
    with must_not_block(), pytest.raises(InputError, match=rf"{source / 'b.jsonl'}: a FIFO, not a regular file"):
        ingest(IngestConfig(sources=[str(source)]), tmp_path / "data")
    with must_not_block(), pytest.raises(InputError, match="a FIFO"):
        source_digests([str(source)])  # the manifest's hashing never opens it either


def test_fifo_as_scoring_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "input.jsonl"
    os.mkfifo(fifo)
    with must_not_block(), pytest.raises(InputError, match=rf"{fifo}: not a regular file"):
        TextChunks(fifo, "text", 10)


def test_device_named_as_a_source_is_refused(tmp_path):
    with must_not_block(), pytest.raises(InputError, match="/dev/zero: a device, not a regular file"):
        ingest(IngestConfig(sources=["/dev/zero"]), tmp_path / "data")


@pytest.mark.parametrize("kind", ["directory", "glob"])
def test_symlink_leading_out_of_the_source_is_refused_and_not_read(tmp_path, kind):
    outside = write_jsonl(tmp_path / "secret.jsonl", ["a private document"])
    source = tmp_path / "corpus"
    source.mkdir()
    write_jsonl(source / "a.jsonl", ["one document"])
    (source / "b.jsonl").symlink_to(outside)
    spec = str(source) if kind == "directory" else f"{source}/*.jsonl"
    before = outside.stat().st_atime_ns
    with pytest.raises(InputError, match=rf"{source / 'b.jsonl'}: leads to {outside}, outside the source directory"):
        ingest(IngestConfig(sources=[spec]), tmp_path / "data")
    with pytest.raises(InputError, match="outside the source directory"):
        source_digests([spec])
    assert outside.stat().st_atime_ns == before  # neither the reader nor the hashing opened it


def test_symlink_out_through_a_linked_directory_in_a_glob_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "x.jsonl", ["not ours"])
    source = tmp_path / "corpus"
    source.mkdir()
    write_jsonl(source / "a.jsonl", ["one document"])
    (source / "linked").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InputError, match="outside the source directory"):
        ingest(IngestConfig(sources=[f"{source}/**/*.jsonl"]), tmp_path / "data")


def test_symlink_inside_the_source_and_a_named_file_symlink_are_read(tmp_path):
    source = tmp_path / "corpus"
    (source / "real").mkdir(parents=True)
    write_jsonl(source / "real" / "a.jsonl", ["one document", "two documents"])
    (source / "alias.jsonl").symlink_to(source / "real" / "a.jsonl")
    docs = list(Reader().documents([str(source)]))
    assert len(docs) == 4  # the file, and the link to it inside the source
    link = tmp_path / "named.jsonl"
    link.symlink_to(source / "real" / "a.jsonl")
    assert [d.text for d in Reader().documents([str(link)])] == ["one document", "two documents"]


def test_broken_symlink_in_a_source_names_it(tmp_path):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "gone.jsonl").symlink_to(source / "missing.jsonl")
    with pytest.raises(InputError, match=rf"{source / 'gone.jsonl'}: a broken symlink"):
        list(Reader().documents([str(source)]))


# --- Parquet row groups whose texts are large ------------------------------------------------


def write_parquet(path: Path, rows: int, text_bytes: int, row_group_rows: int) -> list[str]:
    texts = [f"{i:08d}" + "t" * (text_bytes - 8) for i in range(rows)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_rows)
    return texts


def test_parquet_row_group_over_the_bound_is_refused_naming_it(tmp_path):
    path = tmp_path / "big.parquet"
    write_parquet(path, rows=48, text_bytes=1 << 20, row_group_rows=16)  # three 16 MiB row groups
    reader = Reader(max_row_group_bytes=8 << 20)
    with pytest.raises(InputError, match=rf"{path}: row group 0 \(16 rows\) holds 16 MiB .*max_row_group_bytes"):
        next(reader.read_file(path))
    with pytest.raises(InputError, match="max_row_group_bytes"):
        ingest(IngestConfig(sources=[str(path)], max_row_group_bytes=8 << 20), tmp_path / "data")


def test_parquet_large_row_groups_under_the_bound_read_exact_in_byte_bounded_batches(tmp_path):
    path = tmp_path / "big.parquet"
    texts = write_parquet(path, rows=48, text_bytes=1 << 20, row_group_rows=16)
    assert [d.text for d in Reader(max_document_bytes=2 << 20, max_row_group_bytes=32 << 20).read_file(path)] == texts


def test_ingest_config_bounds_row_groups_by_a_positive_size():
    from gptcore.errors import ConfigError

    with pytest.raises(ConfigError, match="max_row_group_bytes"):
        IngestConfig(max_row_group_bytes=0)
