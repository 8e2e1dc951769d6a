"""Which optional branches of the pipeline run, decided from the config and the ingested splits."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptcore.config import IngestConfig, PipelineConfig
from gptcore.data.availability import CHAT, CLASSIFIER, SCORE, optional_stages
from gptcore.data.ingest import ingest
from gptcore.errors import InputError
from tests.conftest import WORDS, topic_texts, write_input


def ingested(tmp_path: Path, name: str, records: list[dict], metadata_fields=()) -> Path:
    """`records` written as the file `name` (.jsonl or .csv) and ingested; the data directory."""
    source = tmp_path / name
    write_input(source, pa.Table.from_pylist(records))
    out = tmp_path / source.stem
    ingest(
        IngestConfig(sources=[str(source)], metadata_fields=list(metadata_fields), val_fraction=0.2, test_fraction=0.2),
        out,
    )
    return out


def scene(i: int, rng: random.Random) -> str:
    """A scene in the plays' markup: speeches under **SPEAKER** lines."""
    speeches = [f"**{who}**\n\n{' '.join(rng.choice(WORDS['sea']) for _ in range(8))}\n" for who in ("ANNA", "BEN") * 2]
    return f"## Scene {i}\n\n" + "\n".join(speeches)


def config(label_field: str = "genre", finetune=None, sft=None, score=None) -> PipelineConfig:
    """The default config with these fields of the optional branches' sections changed."""
    cfg = PipelineConfig()
    cfg.finetune = replace(cfg.finetune, label_field=label_field, **(finetune or {}))
    cfg.sft = replace(cfg.sft, **(sft or {}))
    cfg.score = replace(cfg.score, **(score or {}))
    return cfg


@pytest.fixture
def plain_text(tmp_path) -> Path:
    return ingested(tmp_path, "plain.jsonl", [{"text": t} for t in topic_texts(40)])


@pytest.fixture
def labelled_csv(tmp_path) -> Path:
    return ingested(
        tmp_path,
        "labelled.csv",
        [{"text": t, "label": ["sea", "land"][i % 2]} for i, t in enumerate(topic_texts(40))],
        ["label"],
    )


@pytest.fixture
def dialogue(tmp_path) -> Path:
    rng = random.Random(0)
    return ingested(tmp_path, "scenes.jsonl", [{"text": scene(i, rng)} for i in range(40)])


def test_the_built_in_plays_run_every_branch(tmp_path):
    ingest(IngestConfig(), tmp_path / "data")
    assert optional_stages(config(), tmp_path / "data") == {CLASSIFIER: None, SCORE: None, CHAT: None}


def test_plain_text_runs_only_the_lm_and_says_what_to_set(plain_text):
    skipped = optional_stages(config(), plain_text)
    assert set(skipped) == {CLASSIFIER, SCORE, CHAT}
    assert skipped[CLASSIFIER].startswith("classifier skipped: the corpus has no 'genre' column (columns: id, text")
    assert "set finetune.label_field" in skipped[CLASSIFIER] and "finetune.enabled: false" in skipped[CLASSIFIER]
    assert skipped[SCORE] == "score skipped: it scores with the classifier, which is skipped"
    assert skipped[CHAT].startswith("chat skipped: the corpus has no dialogue")
    assert "set sft.data to a chat JSONL file, or sft.enabled: false" in skipped[CHAT]
    assert all("\n" not in reason for reason in skipped.values())  # one log line each


def test_a_labelled_corpus_runs_the_classifier_and_scoring(labelled_csv):
    skipped = optional_stages(config("label"), labelled_csv)
    assert skipped[CLASSIFIER] is None and skipped[SCORE] is None
    assert skipped[CHAT].startswith("chat skipped: ")


def test_a_label_field_the_corpus_lacks_is_named(labelled_csv):
    reason = optional_stages(config("lable"), labelled_csv)[CLASSIFIER]
    assert reason.startswith("classifier skipped: the corpus has no 'lable' column (columns: id, text, source, label)")


def test_one_label_is_no_classification_task(tmp_path):
    data = ingested(tmp_path, "one.jsonl", [{"text": t, "label": "sea"} for t in topic_texts(40)], ["label"])
    reason = optional_stages(config("label"), data)[CLASSIFIER]
    assert reason.startswith("classifier skipped: the train split has 1 distinct 'label' label(s)")


def test_dialogue_in_every_split_runs_chat(dialogue):
    assert optional_stages(config(), dialogue)[CHAT] is None


def test_dialogue_missing_from_one_split_is_named(dialogue):
    test_split = dialogue / "test.parquet"
    table = pq.read_table(test_split)
    pq.write_table(
        table.set_column(table.column_names.index("text"), "text", pa.array(["plain text"] * len(table))), test_split
    )
    assert optional_stages(config(), dialogue)[CHAT].startswith(
        "chat skipped: the corpus has no dialogue in its test split"
    )


def test_a_chat_file_runs_chat_without_dialogue_in_the_corpus(plain_text, tmp_path):
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n", encoding="utf-8")
    assert optional_stages(config(sft={"data": str(chat_file)}), plain_text)[CHAT] is None


def test_each_branch_turns_off_by_its_switch(labelled_csv, dialogue):
    off = optional_stages(config("label", finetune={"enabled": False}), labelled_csv)
    assert off[CLASSIFIER] == "classifier skipped: finetune.enabled is false"
    assert off[SCORE] == "score skipped: it scores with the classifier, which is skipped"
    assert optional_stages(config(sft={"enabled": False}), dialogue)[CHAT] == "chat skipped: sft.enabled is false"
    no_scoring = optional_stages(config("label", score={"enabled": False}), labelled_csv)
    assert no_scoring[CLASSIFIER] is None and no_scoring[SCORE] == "score skipped: score.enabled is false"


def test_no_ingested_corpus_is_an_error_not_a_skip(tmp_path):
    with pytest.raises(InputError, match="run `gptcore ingest` first"):
        optional_stages(config(), tmp_path / "nothing")
