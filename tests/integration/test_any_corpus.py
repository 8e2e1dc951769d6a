"""The main job on a user's own corpus: the LM always, the branches the corpus has no data for
skipped with one log line each and a line in the summary, the rest evaluated, exported and registered."""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from gptcore.layout import CHAMPION
from tests.conftest import WORDS
from tests.integration.test_pipeline import prefect_artifacts, prefect_logs

# Shorter training than the tiny preset, and encoding in process (a corpus this small does not repay
# starting workers): these tests are about which stages run, not how well they learn.
QUICK = {
    "tokenizer": {"workers": 1},
    "pretrain": {"max_steps": 60, "eval_interval": 30, "log_interval": 20, "checkpoint_interval": 60},
    "finetune": {"max_steps": 60, "eval_interval": 30, "log_interval": 20, "checkpoint_interval": 60},
}


def topic_documents(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(topic, text): `n` documents of 60 to 90 words, each from one topic, the topics taking turns."""
    rng = random.Random(seed)
    topics = sorted(WORDS)
    docs = []
    for i in range(n):
        topic = topics[i % len(topics)]
        docs.append((topic, " ".join(rng.choice(WORDS[topic]) for _ in range(rng.randint(60, 90))) + "."))
    return docs


def run_on(tmp_path: Path, monkeypatch, source: Path, overrides: dict):
    """The tiny pipeline on `source` with the config overrides; (its final state, the MLflow client)."""
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GPTCORE_MLFLOW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./mlflow.yaml here: MLflow goes to a SQLite file in the work directory
    config = tmp_path / "corpus.yaml"
    sections = {**QUICK, **overrides}
    sections["ingest"] = {"sources": [str(source)], "val_fraction": 0.1, "test_fraction": 0.1, **overrides["ingest"]}
    config.write_text(json.dumps(sections), encoding="utf-8")  # JSON is YAML
    workdir = (tmp_path / "work").resolve()
    state = pipeline_flow(preset="tiny", config_path=str(config), workdir=str(workdir), return_state=True)
    assert state.is_completed()
    return state, MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")


def champions(client) -> dict[str, str]:
    """Registered model -> the version holding its champion alias."""
    return {
        m.name: str(client.get_model_version_by_alias(m.name, CHAMPION).version)
        for m in client.search_registered_models()
    }


def stages_run(client) -> set[str]:
    runs = client.search_runs([client.get_experiment_by_name("gptcore").experiment_id])
    return {r.data.tags["gptcore.stage"] for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_plain_text_builds_registers_and_serves_the_lm_alone(prefect_server, tmp_path, monkeypatch):
    source = tmp_path / "notes.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in topic_documents(300)), encoding="utf-8")
    state, client = run_on(tmp_path, monkeypatch, source, {"ingest": {}})
    summary = state.result()

    assert champions(client) == {"gptcore-lm": "1"}
    assert set(summary["models"]) == {"gptcore-lm"} and summary["models"]["gptcore-lm"]["promoted"]
    assert set(summary["skipped"]) == {"classifier", "score", "chat"}
    assert "no 'genre' column" in summary["skipped"]["classifier"] and "finetune.label_field" in summary["text"]
    assert "no dialogue" in summary["skipped"]["chat"] and "sft.data" in summary["text"]
    assert summary["headline"]["lm_test_bpb"] < summary["headline"]["lm_unigram_test_bpb"]
    assert summary["headline"]["classifier_test_macro_f1"] is None and summary["scores_path"] is None
    assert stages_run(client) == {"ingest", "tokenizer", "pretrain", "evaluate_lm", "export_lm", "register_lm"}

    flow_run_id = state.state_details.flow_run_id
    logs = prefect_logs(flow_run_id)
    for reason in summary["skipped"].values():
        assert logs.count(reason) == 1  # one line per skipped branch, as the summary gives it
    artifacts = prefect_artifacts(flow_run_id)
    assert "gptcore-lm" in artifacts["gptcore-promotion"] and "gptcore-classifier" not in artifacts["gptcore-promotion"]
    assert "gptcore-chat-samples" not in artifacts


def test_a_labelled_csv_without_dialogue_gets_its_classifier_and_no_chat(prefect_server, tmp_path, monkeypatch):
    source = tmp_path / "labelled.csv"
    docs = topic_documents(300)
    pcsv.write_csv(pa.table({"text": [text for _, text in docs], "topic": [topic for topic, _ in docs]}), source)
    overrides = {"ingest": {"metadata_fields": ["topic"]}, "finetune": {**QUICK["finetune"], "label_field": "topic"}}
    state, client = run_on(tmp_path, monkeypatch, source, overrides)
    summary = state.result()
    h = summary["headline"]

    assert champions(client) == {"gptcore-lm": "1", "gptcore-classifier": "1"}
    assert set(summary["skipped"]) == {"chat"} and "no dialogue" in summary["skipped"]["chat"]
    assert h["classifier_test_macro_f1"] > h["majority_test_macro_f1"]
    assert h["classifier_parity_max_abs_logit_diff"] < 1e-3 and h["chat_test_response_bpb"] is None
    assert summary["scores_rows"] == pq.read_metadata(tmp_path / "work" / "data" / "test.parquet").num_rows
    assert "sft" not in stages_run(client) and "evaluate_sft" not in stages_run(client)
    assert "score" in stages_run(client)
    assert "gptcore-chat-samples" not in prefect_artifacts(state.state_details.flow_run_id)
