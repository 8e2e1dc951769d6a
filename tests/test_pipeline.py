"""End to end: the real Prefect flow (temporary local server), real MLflow (SQLite), real ONNX Runtime."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gptcore.registry import CHAMPION


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (and database) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_tiny_pipeline_end_to_end(prefect_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GPTCORE_MLFLOW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./mlflow.yaml here: the defaults put MLflow in the work directory
    workdir = tmp_path / "work"
    summary = run_pipeline("tiny", workdir=workdir)
    h = summary["headline"]

    assert summary["tracking_uri"] == f"sqlite:///{workdir.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for name in ("gptcore-lm", "gptcore-classifier"):
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert str(champion.version) == summary["models"][name]["version"] == "1"
        assert len(champion.tags["gptcore.data_digest"]) == 64

    assert h["lm_parity_max_abs_logit_diff"] < 1e-3
    assert h["lm_parity_greedy_tokens_equal"] == 32
    assert h["classifier_parity_max_abs_logit_diff"] < 1e-3
    assert h["lm_test_bpb"] < h["lm_unigram_test_bpb"]
    assert h["classifier_test_macro_f1"] > h["majority_test_macro_f1"]

    test_docs = pq.read_metadata(workdir / "data" / "test.parquet").num_rows
    scores = pq.read_table(summary["scores_path"])
    assert scores.num_rows == test_docs == summary["scores_rows"]
    assert {"label", "confidence", "prob_tragedies"} <= set(scores.column_names)

    # one MLflow run per stage, nested under the pipeline run
    exp = client.get_experiment_by_name("gptcore")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("gptcore.stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.data.tags["gptcore.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert children == {"ingest", "tokenizer", "pretrain", "finetune", "evaluate_lm", "evaluate_classifier",
                        "export_lm", "export_classifier", "register_lm", "register_classifier", "score"}
    assert Path(workdir / "eval" / "samples.txt").read_text().count("--- prompt") == 3
