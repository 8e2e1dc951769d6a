"""Streaming ingestion: compressed and CSV sources, cleaning counts, dedup, read policies, shards, lineage, reuse."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from gptcore.config import IngestConfig, TokenizerConfig
from gptcore.data import dedup
from gptcore.data.dedup import ExactDedup, NearDedup, minhash
from gptcore.data.ingest import ingest
from gptcore.data.tokenizer import train_tokenizer
from gptcore.errors import InputError
from gptcore.layout import SPLITS
from gptcore.results import TokenShards, load_tokenized, read_split, read_tokens
from tests.conftest import SUBPROCESS_ENV as ENV
from tests.unit.data.test_ingest import all_rows, texts, write_jsonl


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def keep_even_numbers(text: str, metadata: dict) -> bool:
    """A user predicate for the `filters` hook: keeps documents whose number is even."""
    return int(text.split()[1].rstrip(":")) % 2 == 0


# --- sources --------------------------------------------------------------------------------


def test_compressed_jsonl_and_csv_give_the_same_documents_as_plain_jsonl(tmp_path):
    import zstandard

    records = [{"text": t, "label": "x" if i % 2 else "y"} for i, t in enumerate(texts(6))]
    plain = write_jsonl(tmp_path / "c.jsonl", records)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    pcsv.write_csv(pa.Table.from_pylist(records), tmp_path / "c.csv")
    seen = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.csv"):
        ingest(
            IngestConfig(sources=[str(tmp_path / name)], metadata_fields=["label"]), tmp_path / name.replace(".", "_")
        )
        seen[name] = sorted((r["text"], r["label"]) for r in all_rows(tmp_path / name.replace(".", "_")))
    assert seen["c.jsonl"] == sorted((r["text"], r["label"]) for r in records)
    assert seen["c.jsonl.gz"] == seen["c.jsonl.zst"] == seen["c.csv"] == seen["c.jsonl"]


def test_manifest_names_every_source_file_by_sha256(tmp_path):
    from gptcore.fsutil import sha256_file

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(5)])
    ingest(IngestConfig(sources=[str(a)]), tmp_path / "out")
    (source,) = manifest(tmp_path / "out")["sources"]
    assert source["files"] == [{"name": "a.jsonl", "bytes": a.stat().st_size, "sha256": sha256_file(a)}]


# --- cleaning and filtering, each counted ------------------------------------------------------


def test_pii_control_characters_and_length_filters_are_applied_and_counted(tmp_path):
    records = [
        {"text": "write to ada.lovelace@example.org or bob@mail.example.com today"},
        {"text": "call 555-123-4567 or (020) 7946 0958 from 192.168.1.20, not on 2024-11-23 in 1599"},
        {"text": "bell\x07 and\x00 nul\x1b but\ttab\nand newline stay"},
        {"text": "tiny"},
        {"text": "x" * 500},
        *({"text": t} for t in texts(4)),
    ]
    src = write_jsonl(tmp_path / "pii.jsonl", records)
    ingest(IngestConfig(sources=[str(src)], min_document_bytes=10, max_document_bytes=400), tmp_path / "out")
    rows = {r["id"]: r["text"] for r in all_rows(tmp_path / "out")}
    assert rows["pii.jsonl:1"] == "write to <EMAIL> or <EMAIL> today"
    assert rows["pii.jsonl:2"] == "call <PHONE> or <PHONE> from <IP_ADDRESS>, not on 2024-11-23 in 1599"
    assert rows["pii.jsonl:3"] == "bell and nul but\ttab\nand newline stay"
    counts = manifest(tmp_path / "out")["counts"]
    assert counts["pii_email"] == 2 and counts["pii_phone"] == 2 and counts["pii_ip"] == 1
    assert counts["control_chars_removed"] == 3
    assert counts["dropped_too_short"] == 1 and counts["dropped_too_long"] == 1


def test_user_predicates_plug_in_and_are_counted(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [{"text": t} for t in texts(12)])
    ingest(
        IngestConfig(sources=[str(src)], filters=["tests.unit.data.test_corpus_at_scale:keep_even_numbers"]),
        tmp_path / "out",
    )
    assert sorted(r["text"] for r in all_rows(tmp_path / "out")) == sorted(texts(12)[::2])
    assert manifest(tmp_path / "out")["dropped"] == {"by_keep_even_numbers": 6}


def test_near_duplicates_are_dropped_only_when_asked(tmp_path):
    base = " ".join(f"word{i}" for i in range(200))
    near = base.replace("word100", "changed")  # one word in 200 differs
    src = write_jsonl(tmp_path / "near.jsonl", [{"text": base}, {"text": near}, *({"text": t} for t in texts(4))])
    ingest(IngestConfig(sources=[str(src)]), tmp_path / "exact")
    ingest(IngestConfig(sources=[str(src)], near_dedup=True), tmp_path / "near")
    assert len(all_rows(tmp_path / "exact")) == 6
    assert len(all_rows(tmp_path / "near")) == 5
    assert manifest(tmp_path / "near")["dropped"] == {"near_duplicate": 1}


def test_exact_dedup_index_merges_without_forgetting(monkeypatch):
    monkeypatch.setattr(dedup, "_MERGE_EVERY", 4)
    seen = ExactDedup()
    assert not any(seen.seen(f"doc {i}") for i in range(10))
    assert len(seen.sorted) == 8 and len(seen.recent) == 2  # two merges happened
    assert all(seen.seen(f"doc {i}") for i in range(10))
    assert len(seen) == 10


def test_near_dedup_tells_unrelated_documents_apart():
    near = NearDedup(threshold=0.8)
    assert not near.seen(minhash("the quick brown fox jumps over the lazy dog " * 5))
    assert not near.seen(minhash("an entirely different sentence about ships and the sea " * 5))
    assert near.seen(minhash("the quick brown fox jumps over the lazy dog " * 5))


# --- read policies ------------------------------------------------------------------------------


def test_invalid_utf8_fails_with_the_file_byte_offset_or_is_replaced_and_counted(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(
        b'{"text": "fine one"}\n{"text": "caf\xe9"}\n'
        + "".join(json.dumps({"text": t}) + "\n" for t in texts(3)).encode()
    )
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid UTF-8 at byte offset 34 "):
        ingest(IngestConfig(sources=[str(src)]), tmp_path / "fail")
    ingest(IngestConfig(sources=[str(src)], invalid_utf8="replace"), tmp_path / "replace")
    assert "caf\ufffd" in {r["text"] for r in all_rows(tmp_path / "replace")}
    assert manifest(tmp_path / "replace")["counts"]["invalid_utf8_replaced"] == 1


def test_bad_records_are_skipped_and_counted_when_the_policy_says_so(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"text": texts(5)[0]}),
                "{not json",
                json.dumps({"body": "no text"}),
                json.dumps({"text": 7}),
                json.dumps(["a list"]),
                *(json.dumps({"text": t}) for t in texts(5)[1:]),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    ingest(IngestConfig(sources=[str(src), str(empty)], bad_records="skip"), tmp_path / "out")
    assert len(all_rows(tmp_path / "out")) == 5
    counts = manifest(tmp_path / "out")["counts"]
    assert {k: v for k, v in counts.items() if k.startswith("skipped_")} == {
        "skipped_not_json": 1,
        "skipped_missing_field": 1,
        "skipped_text_not_a_string": 1,
        "skipped_not_an_object": 1,
    }
    assert counts["dropped_empty"] == 1


def test_parquet_with_a_non_text_text_column_is_refused(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(InputError, match=r"ints\.parquet: column 'text' holds int64, not text"):
        ingest(IngestConfig(sources=[str(tmp_path / "ints.parquet")]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_one_gigabyte_line_is_streamed_past_not_loaded(tmp_path):
    """A 1 GB JSONL line is skipped and counted while the process stays far below 1 GB of memory."""
    src = tmp_path / "huge.jsonl"
    with open(src, "wb") as f:
        f.write(json.dumps({"text": texts(1)[0]}).encode() + b"\n" + b'{"text": "')
        chunk = b"a" * (64 << 20)
        for _ in range(16):
            f.write(chunk)
        f.write(b'"}\n' + "".join(json.dumps({"text": t}) + "\n" for t in texts(4)[1:]).encode())
    script = (
        "import json, sys\n"
        "from gptcore.config import IngestConfig\nfrom gptcore.data.ingest import ingest\n"
        "r = ingest(IngestConfig(sources=[sys.argv[1]], max_document_bytes=1_000_000), sys.argv[2])\n"
        # VmHWM, not ru_maxrss: Linux carries a parent's peak into a forked child's ru_maxrss.
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print(json.dumps({'docs': sum(r.documents.values()), 'maxrss_kb': int(hwm.split()[1])}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(tmp_path / "out")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["docs"] == 4
    assert out["maxrss_kb"] < 600 * 1024  # a process that read the line whole would pass 1 GB
    assert manifest(tmp_path / "out")["counts"]["skipped_too_long"] == 1


# --- shards, sampling, lineage, reuse -------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    src = write_jsonl(root / "c.jsonl", [{"text": t * 20} for t in texts(60)])
    ingest(IngestConfig(sources=[str(src)], val_fraction=0.1, test_fraction=0.1), root / "data")
    return root


def test_shards_are_fixed_size_and_identical_whatever_the_worker_count(corpus_dir, tmp_path):
    one = train_tokenizer(
        TokenizerConfig(vocab_size=300, shard_tokens=1000, workers=1), corpus_dir / "data", tmp_path / "one"
    )
    two = train_tokenizer(
        TokenizerConfig(vocab_size=300, shard_tokens=1000, workers=2), corpus_dir / "data", tmp_path / "two"
    )
    assert one.digest == two.digest and one.shards == two.shards
    listed = json.loads((tmp_path / "one" / "tokens.json").read_text())
    assert listed["sources"] == manifest(corpus_dir / "data")["sources"] and listed["sources"][0]["files"][0]["sha256"]
    for shard, path in zip(listed["splits"]["train"]["shards"], one.shard_paths("train")):
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["tokens"] * 2 == path.stat().st_size
    assert len(one.shards["train"]) > 3
    sizes = [p.stat().st_size // 2 for p in one.shard_paths("train")]
    assert all(size == 1000 for size in sizes[:-1]) and 0 < sizes[-1] <= 1000
    whole = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in one.shard_paths("train")])
    tokens = read_tokens(one, "train")
    assert len(tokens) == whole.size == one.tokens["train"]
    for start, stop in [(0, 10), (995, 1010), (1990, 3005), (whole.size - 7, whole.size)]:
        assert np.array_equal(tokens[start:stop], whole[start:stop]), (start, stop)
    assert np.array_equal(tokens.bincount(300), np.bincount(whole, minlength=300))


def test_tokenizer_trains_on_a_sample_when_asked(corpus_dir, tmp_path):
    train_bytes = json.loads((corpus_dir / "data" / "manifest.json").read_text())["splits"]["train"]["bytes"]
    train_tokenizer(TokenizerConfig(vocab_size=300, sample_bytes=train_bytes // 4), corpus_dir / "data", tmp_path / "t")
    sample = json.loads((tmp_path / "t" / "tokens.json").read_text())["sample"]
    assert sample["every"] == 4


def test_unchanged_inputs_do_no_work_and_a_changed_input_reruns_what_depends_on_it(tmp_path, caplog):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(20)])
    cfg = IngestConfig(sources=[str(src)], val_fraction=0.1, test_fraction=0.1)
    ingest(cfg, tmp_path / "data")
    train_tokenizer(TokenizerConfig(vocab_size=300), tmp_path / "data", tmp_path / "tok")
    written = {p: p.stat().st_mtime_ns for p in [*(tmp_path / "data").iterdir(), *(tmp_path / "tok").iterdir()]}
    caplog.set_level("INFO", logger="gptcore")
    ingest(cfg, tmp_path / "data")
    train_tokenizer(TokenizerConfig(vocab_size=300), tmp_path / "data", tmp_path / "tok")
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing rewritten
    assert sum("nothing to do" in r.getMessage() for r in caplog.records) == 2
    before = load_tokenized(tmp_path / "tok").data_digest
    write_jsonl(src, [{"text": t} for t in texts(21)])  # one more document
    ingest(cfg, tmp_path / "data")
    retrained = train_tokenizer(TokenizerConfig(vocab_size=300), tmp_path / "data", tmp_path / "tok")
    assert retrained.data_digest != before and retrained.tokens["train"] > 0


def test_every_run_and_version_names_the_data_it_was_trained_on(trained, mlflow_tracking, tmp_path):
    """ingest and tokenizer runs log their manifests as MLflow dataset inputs; pretraining names the shards."""
    from gptcore.results import load_pretrained

    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(10)])
    data = ingest(IngestConfig(sources=[str(src)]), tmp_path / "data", tracking=mlflow_tracking)
    tok = train_tokenizer(
        TokenizerConfig(vocab_size=300), tmp_path / "data", tmp_path / "tok", tracking=mlflow_tracking
    )
    client = mlflow_tracking.client()
    runs = {r.data.tags["gptcore.stage"]: r for r in client.search_runs([mlflow_tracking.experiment_id()])}
    (ingest_input,) = runs["ingest"].inputs.dataset_inputs
    assert ingest_input.dataset.digest == data.digest[:32] and ingest_input.dataset.name == "corpus"
    (tok_input,) = runs["tokenizer"].inputs.dataset_inputs
    assert tok_input.dataset.digest == tok.digest[:32]
    assert runs["tokenizer"].data.tags["gptcore.data_digest"] == data.digest
    meta = json.loads((Path(load_pretrained(trained["pre"]).best_dir) / "model.json").read_text())
    assert meta["tokens_digest"] == load_tokenized(trained["tokenizer"]).digest  # what export and register carry


def test_a_failed_tokenizer_run_leaves_no_shards_or_manifest(corpus_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in (corpus_dir / "data").iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "val.parquet").write_bytes(b"not parquet any more")
    with pytest.raises(pa.ArrowInvalid, match="Parquet"):  # the corrupt split is read while encoding
        train_tokenizer(TokenizerConfig(vocab_size=300), data, tmp_path / "tok")
    assert not (tmp_path / "tok").exists() and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_split_files_stream_in_row_groups(tmp_path, monkeypatch):
    from gptcore.data import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "_ROW_GROUP_BYTES", 200)
    monkeypatch.setattr(ingest_module.SplitAssigner, "SMALL_CORPUS", (5, 1 << 20))  # stream past 5 documents
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t * 3} for t in texts(400)])
    result = ingest(IngestConfig(sources=[str(src)], val_fraction=0.1, test_fraction=0.1), tmp_path / "out")
    assert pq.ParquetFile(result.split_path("train")).num_row_groups > 10
    assert sum(result.documents.values()) == 400
    assert sorted(r["text"] for s in SPLITS for r in read_split(tmp_path / "out", s).to_pylist()) == sorted(
        t * 3 for t in texts(400)
    )


def test_token_shards_reject_strided_slices(tmp_path):
    (tmp_path / "a.bin").write_bytes(np.arange(5, dtype=np.uint16).tobytes())
    with pytest.raises(IndexError):
        TokenShards([tmp_path / "a.bin"], np.dtype(np.uint16))[::2]


def test_a_hugging_face_dataset_streams_without_being_downloaded_whole(tmp_path, monkeypatch):
    """`hf:` with a local dataset folder goes through `datasets.load_dataset(..., streaming=True)`, no hub."""
    import datasets
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf", raising=False)
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": t, "n": i} for i, t in enumerate(texts(8))])
    loaded = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    ingest(IngestConfig(sources=[f"hf:{folder}"]), tmp_path / "out")
    assert [type(ds).__name__ for ds in loaded] == ["IterableDataset"]
    assert sorted(r["text"] for r in all_rows(tmp_path / "out")) == sorted(texts(8))
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.arrow"))  # nothing materialised
