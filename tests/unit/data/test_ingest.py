import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptcore.config import IngestConfig
from gptcore.data.ingest import ingest
from gptcore.data.sources import GENRES
from gptcore.errors import InputError
from gptcore.fsutil import atomic_dir, atomic_file
from gptcore.layout import SPLITS
from gptcore.results import load_ingest, read_split


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def texts(n: int, prefix: str = "document") -> list[str]:
    return [f"{prefix} {i}: some words about {prefix} number {i}.\n" for i in range(n)]


def read_all(out_dir: Path) -> dict[str, list[dict]]:
    return {s: read_split(out_dir, s).to_pylist() for s in SPLITS}


def all_rows(out_dir: Path) -> list[dict]:
    return [row for rows in read_all(out_dir).values() for row in rows]


# --- the built-in Shakespeare corpus ---------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare") / "data"
    result = ingest(IngestConfig(), out, tracking=None)
    return result, read_all(out)


def test_shakespeare_train_has_every_genre_with_play_and_scene(shakespeare):
    _result, splits = shakespeare
    train = splits["train"]
    assert {row["genre"] for row in train} == set(GENRES)
    for rows in splits.values():
        assert rows and set(rows[0]) == {"id", "text", "source", "genre", "play", "scene"}
        assert all(row["play"] and row["scene"] and row["text"].strip() for row in rows)
    assert len({row["play"] for row in train}) == 38


def test_shakespeare_no_scene_is_in_two_splits(shakespeare):
    _, splits = shakespeare
    ids = {s: [row["id"] for row in rows] for s, rows in splits.items()}
    for s in SPLITS:
        assert len(ids[s]) == len(set(ids[s])), f"duplicate id within {s}"
    assert not set(ids["train"]) & set(ids["val"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["val"]) & set(ids["test"])
    scenes = {s: {(row["play"], row["scene"], row["text"]) for row in rows} for s, rows in splits.items()}
    assert not scenes["train"] & (scenes["val"] | scenes["test"])


def test_shakespeare_split_is_deterministic(shakespeare, tmp_path):
    first, first_splits = shakespeare
    second = ingest(IngestConfig(), tmp_path / "again", tracking=None)
    assert second.digest == first.digest
    assert second.documents == first.documents
    assert {s: [r["id"] for r in rows] for s, rows in read_all(tmp_path / "again").items()} == {
        s: [r["id"] for r in rows] for s, rows in first_splits.items()
    }


def test_manifest_counts_match_the_parquet_files(shakespeare):
    result, splits = shakespeare
    manifest = json.loads(Path(result.manifest_path).read_text(encoding="utf-8"))
    for s in SPLITS:
        rows = splits[s]
        assert pq.ParquetFile(result.split_path(s)).metadata.num_rows == len(rows)
        assert manifest["splits"][s]["documents"] == len(rows) == result.documents[s]
        assert manifest["splits"][s]["bytes"] == sum(len(r["text"].encode("utf-8")) for r in rows) == result.bytes[s]
    assert manifest["columns"] == ["id", "text", "source", "genre", "play", "scene"]
    expected = sum(result.documents.values()) * 0.05  # each id hashes to val with probability 0.05
    for s in ("val", "test"):
        assert abs(result.documents[s] - expected) <= 3 * expected**0.5 + 1
    assert load_ingest(result.out_dir) == result


# --- local files ------------------------------------------------------------------------------


def test_txt_and_md_files_are_one_document_each(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    contents = {
        "a.txt": "# not a heading split\nalpha text\n",
        "b.md": "## Title\n\nbeta text\n",
        "sub/c.txt": "gamma text\n",
    }
    for name, text in contents.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "notes.rst").write_text("ignored: not a supported suffix\n", encoding="utf-8")
    ingest(IngestConfig(sources=[str(src)]), tmp_path / "out", tracking=None)
    rows = all_rows(tmp_path / "out")
    assert {r["id"]: r["text"] for r in rows} == contents  # ids relative to the source directory
    assert all(r["source"] == str(src / r["id"]) for r in rows)  # the source column keeps the real path


def test_jsonl_keeps_requested_metadata_as_a_column(tmp_path):
    records = [{"text": t, "label": "even" if i % 2 == 0 else "odd", "extra": i} for i, t in enumerate(texts(6))]
    path = write_jsonl(tmp_path / "corpus.jsonl", records)
    result = ingest(IngestConfig(sources=[str(path)], metadata_fields=["label"]), tmp_path / "out", tracking=None)
    rows = all_rows(tmp_path / "out")
    assert set(rows[0]) == {"id", "text", "source", "label"}  # 'extra' was not asked for
    assert sorted((r["text"], r["label"]) for r in rows) == sorted((r["text"], r["label"]) for r in records)
    assert {r["id"] for r in rows} == {f"{path.name}:{i}" for i in range(1, 7)}  # file:line
    assert sum(result.documents.values()) == 6


def test_jsonl_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(
        "\n".join(["", json.dumps({"text": "one"}), "   ", json.dumps({"text": "two"}), json.dumps({"text": "three"})])
        + "\n",
        encoding="utf-8",
    )
    ingest(IngestConfig(sources=[str(path)]), tmp_path / "out", tracking=None)
    assert {r["id"]: r["text"] for r in all_rows(tmp_path / "out")} == {
        f"{path.name}:2": "one",
        f"{path.name}:4": "two",
        f"{path.name}:5": "three",
    }


def test_parquet_source_with_metadata(tmp_path):
    path = tmp_path / "corpus.parquet"
    table = pa.table({"body": texts(5), "label": list("ababa"), "other": [1, 2, 3, 4, 5]})
    pq.write_table(table, path)
    ingest(
        IngestConfig(sources=[str(path)], text_field="body", metadata_fields=["label"]), tmp_path / "out", tracking=None
    )
    rows = all_rows(tmp_path / "out")
    assert set(rows[0]) == {"id", "text", "source", "label"}
    assert sorted((r["id"], r["text"], r["label"]) for r in rows) == sorted(
        (f"{path.name}:{i}", t, lab) for i, (t, lab) in enumerate(zip(texts(5), "ababa"))
    )


def test_glob_source_matches_only_its_pattern(tmp_path):
    for i, t in enumerate(texts(4)):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "skip.md").write_text("not matched\n", encoding="utf-8")
    ingest(IngestConfig(sources=[str(tmp_path / "doc*.txt")]), tmp_path / "out", tracking=None)
    assert sorted(r["text"] for r in all_rows(tmp_path / "out")) == sorted(texts(4))


def test_several_sources_combine_and_order_does_not_change_the_split(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(6, "alpha")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts(6, "beta")])
    one = ingest(
        IngestConfig(sources=[str(a), str(b)], val_fraction=0.2, test_fraction=0.2), tmp_path / "ab", tracking=None
    )
    two = ingest(
        IngestConfig(sources=[str(b), str(a)], val_fraction=0.2, test_fraction=0.2), tmp_path / "ba", tracking=None
    )
    assert sum(one.documents.values()) == 12
    assert one.digest == two.digest and one.documents == two.documents
    for s in SPLITS:  # the same documents in each split, in the order the sources gave them
        assert sorted(read_split(one.out_dir, s)["id"].to_pylist()) == sorted(
            read_split(two.out_dir, s)["id"].to_pylist()
        )


def test_text_is_nfc_normalised_with_lf_line_endings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes("cafe\u0301 one\r\ntwo\rthree\n".encode("utf-8"))
    for i, t in enumerate(texts(3)):
        (src / f"pad{i}.txt").write_text(t, encoding="utf-8")
    result = ingest(IngestConfig(sources=[str(src)]), tmp_path / "out", tracking=None)
    text = {r["id"]: r["text"] for r in all_rows(tmp_path / "out")}["a.txt"]
    assert text == "caf\u00e9 one\ntwo\nthree\n"
    assert sum(result.bytes.values()) == len(text.encode()) + sum(len(t.encode()) for t in texts(3))


def test_exact_duplicates_after_normalisation_are_dropped_and_counted(tmp_path):
    records = [{"text": t} for t in texts(4)]
    records += [{"text": texts(4)[0]}, {"text": texts(4)[1].replace("\n", "\r\n")}, {"text": "  \n"}, {"text": ""}]
    src = write_jsonl(tmp_path / "dups.jsonl", records)
    (tmp_path / "nfd.txt").write_text("cafe\u0301\n", encoding="utf-8")
    (tmp_path / "nfc.txt").write_text("caf\u00e9\n", encoding="utf-8")
    sources = [str(src), str(tmp_path / "nfd.txt"), str(tmp_path / "nfc.txt")]
    result = ingest(IngestConfig(sources=sources), tmp_path / "out", tracking=None)
    manifest = json.loads(Path(result.manifest_path).read_text(encoding="utf-8"))
    assert manifest["dropped"] == {"duplicate": 3, "empty": 2}
    rows = all_rows(tmp_path / "out")
    assert sorted(r["text"] for r in rows) == sorted([*texts(4), "café\n"])
    assert "nfd.txt" in {r["id"] for r in rows}  # the first occurrence is kept

    kept = ingest(IngestConfig(sources=sources, dedup=False), tmp_path / "all", tracking=None)
    assert sum(kept.documents.values()) == 8


# --- bad input: a clear InputError, and nothing written ------------------------------------


def _empty_files(src):
    (src / "empty").mkdir()
    (src / "empty" / "a.txt").write_text("", encoding="utf-8")
    (src / "empty" / "b.md").write_text(" \n\n", encoding="utf-8")
    return [str(src / "empty")], {}


def _not_utf8(src):
    (src / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    return [str(src / "latin1.txt")], {}


def _binary(src):
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return [str(src / "image.txt")], {}


def _jsonl_not_json(src):
    (src / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "oops",}\n', encoding="utf-8")
    return [str(src / "bad.jsonl")], {}


def _jsonl_missing_text(src):
    write_jsonl(src / "bad.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    return [str(src / "bad.jsonl")], {}


def _jsonl_missing_metadata(src):
    write_jsonl(src / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    return [str(src / "bad.jsonl")], {"metadata_fields": ["label"]}


def _jsonl_not_an_object(src):
    (src / "bad.jsonl").write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    return [str(src / "bad.jsonl")], {}


def _jsonl_text_not_a_string(src):
    write_jsonl(src / "bad.jsonl", [{"text": "a"}, {"text": 42}])
    return [str(src / "bad.jsonl")], {}


def _jsonl_line_not_utf8(src):
    (src / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    return [str(src / "bad.jsonl")], {}


def _parquet_without_text(src):
    pq.write_table(pa.table({"body": texts(5)}), src / "bad.parquet")
    return [str(src / "bad.parquet")], {}


def _not_parquet(src):
    (src / "bad.parquet").write_text("this is not parquet\n", encoding="utf-8")
    return [str(src / "bad.parquet")], {}


def _unsupported_file(src):
    (src / "notes.rst").write_text("text\n", encoding="utf-8")
    return [str(src / "notes.rst")], {}


def _missing_path(src):
    return [str(src / "nowhere.txt")], {}


def _glob_matches_nothing(src):
    return [str(src / "*.nomatch")], {}


def _unknown_kind(src):
    return ["s3x:foo"], {}


def _two_documents(src):
    write_jsonl(src / "two.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "a"}])
    return [str(src / "two.jsonl")], {}


def _no_train_left(src):
    write_jsonl(src / "four.jsonl", [{"text": t} for t in texts(4)])
    return [str(src / "four.jsonl")], {"val_fraction": 0.45, "test_fraction": 0.45}


def _mixed_metadata_types(src):
    write_jsonl(src / "mixed.jsonl", [{"text": t, "label": "x" if i < 3 else 7} for i, t in enumerate(texts(5))])
    return [str(src / "mixed.jsonl")], {"metadata_fields": ["label"]}


BAD_INPUTS = {
    "empty corpus": (_empty_files, r"corpus is empty: sources \['.*empty'\]"),
    "not utf-8": (_not_utf8, r"latin1\.txt: not valid UTF-8 at byte offset 3"),
    "binary": (_binary, r"image\.txt: looks binary \(NUL byte at offset 8\)"),
    "jsonl not json": (_jsonl_not_json, r"bad\.jsonl:2: not valid JSON"),
    "jsonl missing text": (_jsonl_missing_text, r"bad\.jsonl:3: record has no field 'text'"),
    "jsonl missing metadata": (_jsonl_missing_metadata, r"bad\.jsonl:2: record has no field 'label'"),
    "jsonl not an object": (_jsonl_not_an_object, r"bad\.jsonl:2: expected a JSON object, got list"),
    "jsonl text not a string": (_jsonl_text_not_a_string, r"bad\.jsonl:2: field 'text' must be a string, got int"),
    "jsonl line not utf-8": (_jsonl_line_not_utf8, r"bad\.jsonl:2: not valid UTF-8"),
    "parquet without text": (_parquet_without_text, r"bad\.parquet: no column 'text' \(columns: \['body'\]\)"),
    "not parquet": (_not_parquet, r"bad\.parquet: not a readable Parquet file"),
    "unsupported file": (_unsupported_file, r"notes\.rst: unsupported file type '\.rst'"),
    "missing path": (_missing_path, r"nowhere\.txt': no such file or directory"),
    "glob matches nothing": (_glob_matches_nothing, r"\*\.nomatch': the glob matches no files"),
    "unknown source kind": (_unknown_kind, r"source 's3x:foo': unknown source kind 's3x'"),
    "fewer than 3 documents": (_two_documents, r"the corpus has 2 document\(s\).*at least 3"),
    "no documents left for train": (_no_train_left, r"4 documents.*leaving none for train"),
    "mixed metadata types": (_mixed_metadata_types, r"mixed\.jsonl:4: field 'label' is int .*mixed\.jsonl:1"),
}


@pytest.fixture
def earlier_ingest(tmp_path):
    """A good corpus already ingested into work/data: (out_dir, {relative name: bytes})."""
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in texts(5)])
    out = tmp_path / "work" / "data"
    ingest(IngestConfig(sources=[str(good)]), out, tracking=None)
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_problem_and_writes_nothing(case, tmp_path, earlier_ingest):
    make, message = BAD_INPUTS[case]
    out, before = earlier_ingest
    src = tmp_path / "src"
    src.mkdir()
    sources, extra = make(src)
    with pytest.raises(InputError, match=message):
        ingest(IngestConfig(sources=sources, **extra), out, tracking=None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(before) == ["manifest.json", "test.parquet", "train.parquet", "val.parquet"]
    assert os.listdir(out.parent) == ["data"]  # no .data.tmp-* or .data.old-* left behind


def test_failed_ingest_into_a_new_directory_creates_nothing(tmp_path):
    (tmp_path / "bad.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(InputError):
        ingest(IngestConfig(sources=[str(tmp_path / "bad.jsonl")]), tmp_path / "work" / "data", tracking=None)
    assert not (tmp_path / "work" / "data").exists()
    assert not (tmp_path / "work").exists() or os.listdir(tmp_path / "work") == []


def test_load_ingest_without_a_manifest(tmp_path):
    with pytest.raises(InputError, match="missing manifest.json"):
        load_ingest(tmp_path)


def test_read_split_names_missing_columns(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(4)])
    ingest(IngestConfig(sources=[str(tmp_path / "c.jsonl")]), tmp_path / "out", tracking=None)
    with pytest.raises(InputError, match=r"train\.parquet: no column\(s\) \['genre'\]"):
        read_split(tmp_path / "out", "train", ["text", "genre"])


# --- fsutil: all or nothing -----------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_atomic_dir_failure_leaves_the_old_directory_untouched(tmp_path):
    final = tmp_path / "out"
    (final / "sub").mkdir(parents=True)
    (final / "a.txt").write_text("old a")
    (final / "sub" / "b.txt").write_text("old b")
    before = _snapshot(final)
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new a")
        (tmp / "c.txt").write_text("new c")
        raise RuntimeError("boom")
    assert _snapshot(final) == before
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_success_replaces_the_whole_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    with atomic_dir(final) as tmp:
        assert tmp != final and tmp.parent == final.parent and not (tmp / "stale.txt").exists()
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # invisible until the block ends
    assert _snapshot(final) == {"new.txt": b"new"}
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_file_failure_leaves_the_old_file_untouched(tmp_path):
    final = tmp_path / "f.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(final) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_file_success_replaces_the_file(tmp_path):
    final = tmp_path / "f.json"
    final.write_text("old")
    with atomic_file(final) as tmp:
        tmp.write_text("new")
        assert final.read_text() == "old"
    assert final.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.json"]


def test_unreachable_hugging_face_dataset_says_what_it_needs(tmp_path, monkeypatch):
    """Offline (no hub, not in the cache): a clear error naming the dataset, not a stack of HTTP errors."""
    import datasets.config
    import huggingface_hub.constants

    # the libraries read these at import: set the module constants as well as the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf", raising=False)
    with pytest.raises(InputError, match=r"hf:gptcore-test/absent.*could not load.*hub to be reachable"):
        ingest(IngestConfig(sources=["hf:gptcore-test/absent"]), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
    """Ids are relative to the source, so a moved or re-spelled corpus splits the same way."""
    for name in ("here", "there"):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "corpus.jsonl", [{"text": t} for t in texts(30)])
    a = ingest(IngestConfig(sources=[str(tmp_path / "here" / "corpus.jsonl")]), tmp_path / "a", tracking=None)
    b = ingest(IngestConfig(sources=[str(tmp_path / "there") + "/"]), tmp_path / "b", tracking=None)
    assert a.digest == b.digest
