"""End to end: the real Prefect flow (temporary local server), real MLflow (SQLite), real ONNX Runtime."""

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.pipeline import STAGE_GRAPH, compress_graph
from gptcore.layout import CHAMPION


def test_tiny_pipeline_end_to_end(prefect_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GPTCORE_MLFLOW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./mlflow.yaml here: the defaults put MLflow in the work directory
    workdir = tmp_path / "work"
    config = tmp_path / "compress.yaml"  # and the LM's student at half its parameters, served by its own alias
    config.write_text("compress:\n  enabled: true\n  fractions: [0.5]\n", encoding="utf-8")
    state = pipeline_flow(preset="tiny", config_path=str(config), workdir=str(workdir), return_state=True)
    assert state.is_completed()
    summary = state.result()
    h = summary["headline"]

    assert summary["tracking_uri"] == f"sqlite:///{workdir.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for name in ("gptcore-lm", "gptcore-classifier", "gptcore-chat"):  # three champions
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert str(champion.version) == summary["models"][name]["version"] == "1"
        assert len(champion.tags["gptcore.data_digest"]) == 64
    student = client.get_model_version_by_alias("gptcore-lm", "p50-distilled")  # judged after the teacher
    assert str(student.version) == "2" and student.tags["gptcore.compression.recipe"] == "prune+distill"
    assert "| gptcore-lm | v2 |" in prefect_artifacts(state.state_details.flow_run_id)["gptcore-promotion"]

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
        "compress",
        "compress_p50-distilled",
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

    # What a person reads: the summary's table whole, the flow graph the pipeline's, runs and versions
    # that say what they are.
    table = markdown_rows(artifacts["gptcore-pipeline-summary"])
    assert table[0] == ["what", "this run"] and all(len(row) == 2 for row in table)
    assert "max \\|dlogit\\|" in dict(table)["ONNX parity"] and "chat max" in dict(table)["ONNX parity"]
    graph = STAGE_GRAPH | compress_graph(["p50-distilled"])
    assert task_graph(state.state_details.flow_run_id) == {stage: set(upstream) for stage, upstream in graph.items()}
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    for run in runs:
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "JOB"
        assert run.data.tags["mlflow.source.name"].startswith("gptcore-pipeline (Prefect flow run ")
    headline = parent[0].data.metrics
    assert headline["lm/test_bpb"] == pytest.approx(h["lm_test_bpb"]) and headline["pipeline/seconds"] > 0
    assert "classifier/test_macro_f1_ci_low" in headline and "chat/test_response_bpb" in headline
    by_stage = {}  # each stage's first run: the teacher's evaluation, export and registration, not the student's
    for run in sorted(runs, key=lambda r: r.info.start_time):
        by_stage.setdefault(run.data.tags["gptcore.stage"], run)
    pretrain = by_stage["pretrain"].data.metrics
    assert {"loss/train", "loss/val", "train/lr", "system/cpu_utilization_percentage"} <= set(pretrain)
    assert [a.path for a in client.list_artifacts(by_stage["pretrain"].info.run_id, "charts")] == ["charts/loss.png"]
    for name, kind in (("gptcore-lm", "lm"), ("gptcore-classifier", "classifier"), ("gptcore-chat", "chat")):
        version = client.get_model_version(name, "1")
        assert version.run_id == by_stage[f"export_{kind}"].info.run_id  # the run that wrote the package
        trained = {"lm": "pretrain", "classifier": "finetune", "chat": "sft"}[kind]
        assert by_stage[trained].info.run_id in version.description
        assert max(len(v) for v in version.tags.values()) < 300


def markdown_rows(markdown: str) -> list[list[str]]:
    """The cells of the first table in a markdown text (header first), split on unescaped pipes."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[start:end]]
    return [row for row in rows if set("".join(row)) != {"-"}]


def task_graph(flow_run_id) -> dict[str, set[str]]:
    """Each task run of a flow run (by task name) -> the task names it waited on or took inputs from."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.id: run.name.rsplit("-", 1)[0] for run in task_runs}
    return {
        names[run.id]: {
            names[i.id] for inputs in run.task_inputs.values() for i in inputs if getattr(i, "id", None) in names
        }
        for run in task_runs
    }


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
