"""End to end: the real Prefect flow (temporary local server), real MLflow (SQLite), real ONNX Runtime."""

from pathlib import Path

import pyarrow.parquet as pq

from gptcore.layout import CHAMPION


def test_tiny_pipeline_end_to_end(prefect_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GPTCORE_MLFLOW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./mlflow.yaml here: the defaults put MLflow in the work directory
    workdir = tmp_path / "work"
    state = pipeline_flow(preset="tiny", workdir=str(workdir), return_state=True)
    assert state.is_completed()
    summary = state.result()
    h = summary["headline"]

    assert summary["tracking_uri"] == f"sqlite:///{workdir.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for name in ("gptcore-lm", "gptcore-classifier", "gptcore-chat"):  # three champions
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert str(champion.version) == summary["models"][name]["version"] == "1"
        assert len(champion.tags["gptcore.data_digest"]) == 64

    assert h["lm_parity_max_abs_logit_diff"] < 1e-3
    assert h["lm_parity_greedy_tokens_equal"] == 32
    assert h["classifier_parity_max_abs_logit_diff"] < 1e-3
    assert h["chat_parity_max_abs_logit_diff"] < 1e-3
    assert h["lm_test_bpb"] < h["lm_unigram_test_bpb"]
    assert h["classifier_test_macro_f1"] > h["majority_test_macro_f1"]
    assert h["chat_test_response_bpb"] < h["chat_base_test_response_bpb"]
    assert (workdir / "eval" / "sft_samples.md").read_text().count("## Prompt") == 4

    test_docs = pq.read_metadata(workdir / "data" / "test.parquet").num_rows
    scores = pq.read_table(summary["scores_path"])
    assert scores.num_rows == test_docs == summary["scores_rows"]
    assert {"label", "confidence", "prob_tragedies"} <= set(scores.column_names)

    # one MLflow run per stage, nested under the pipeline run
    exp = client.get_experiment_by_name("gptcore")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("gptcore.stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {
        r.data.tags["gptcore.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id
    }
    assert children == {
        "ingest",
        "tokenizer",
        "pretrain",
        "finetune",
        "sft",
        "evaluate_lm",
        "evaluate_classifier",
        "evaluate_sft",
        "export_lm",
        "export_classifier",
        "export_chat",
        "register_lm",
        "register_classifier",
        "register_chat",
        "score",
    }
    assert Path(workdir / "eval" / "samples.txt").read_text().count("--- prompt") == 3

    # the stages' own log lines reach the Prefect run, not only the console
    messages = prefect_logs(state.state_details.flow_run_id)
    assert any("pretrain: step" in m and "ETA" in m for m in messages)
    assert any(m.startswith("register: gptcore-classifier v1") for m in messages)
    artifacts = prefect_artifacts(state.state_details.flow_run_id)
    assert "first version" in artifacts["gptcore-promotion"] and "gptcore-classifier" in artifacts["gptcore-promotion"]
    assert artifacts["gptcore-chat-samples"].count("## Prompt") == 4
    versions = artifacts["gptcore-chat-versions"]  # the new chat version answering held-out conversations
    assert versions.count("## Conversation") == 3 and "v1 (new)" in versions
    assert "### Conversation 1" in artifacts["gptcore-pipeline-summary"]


def prefect_artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in found}


def prefect_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is still queued
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return messages
