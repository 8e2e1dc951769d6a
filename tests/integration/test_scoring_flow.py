"""Batch scoring as processes see it: a run killed mid-file resumes, and the scoring flow on a local
Prefect server with a classifier registered in a real SQLite MLflow store."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from gptcore.runtime import score_file
from tests.conftest import input_file, topic_texts

KILLED_RUN = """
import os, signal, sys
from gptcore.runtime import load_model, score_file

def die(index):
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a machine going down

score_file(load_model(sys.argv[1], device="cpu", threads=1), sys.argv[2], sys.argv[3], chunk_rows=8, on_chunk=die)
"""


def test_killed_process_leaves_no_output_and_the_next_run_resumes(onnx_classifier, classifier_package, tmp_path):
    src, out = input_file(tmp_path, ".parquet"), tmp_path / "out.parquet"
    run = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(classifier_package.package_dir), str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -9, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet.parts"]
    resumed = score_file(onnx_classifier, src, out, chunk_rows=8)
    assert (resumed.chunks, resumed.chunks_skipped) == (6, 2)
    whole = score_file(onnx_classifier, src, tmp_path / "whole.parquet", chunk_rows=8)
    assert pq.read_table(out).equals(pq.read_table(whole.output_path))


def test_scoring_flow_completes_on_the_test_split_and_warns_on_a_shifted_input(
    prefect_server, trained, classifier_package, classifier_evaluation, mlflow_tracking, tmp_path
):
    from flows.scoring import scoring_flow
    from gptcore.layout import SCORING_REFERENCE_TAG
    from gptcore.registry.register import register
    from tests.integration.test_pipeline import prefect_artifacts

    register(classifier_package.package_dir, classifier_evaluation.metrics_path, "clf", mlflow_tracking)
    reference = mlflow_tracking.client().get_model_version("clf", "1").tags[SCORING_REFERENCE_TAG]
    assert reference.startswith("registrations/") and reference.endswith("/evaluation/classifier_scoring_reference.npz")
    settings = mlflow_tracking.settings
    config = tmp_path / "mlflow.yaml"
    config.write_text(
        f"tracking_uri: {settings.tracking_uri}\nartifact_location: {settings.artifact_location}\n"
        f"experiment: {settings.experiment}\n"
    )
    common = {"model_uri": "models:/clf@champion", "workdir": str(tmp_path / "w"), "mlflow_config": str(config)}

    test_split = trained["data"] / "test.parquet"
    state = scoring_flow(
        input_path=str(test_split), output_path=str(tmp_path / "test_scores.parquet"), **common, return_state=True
    )
    assert state.is_completed() and state.name == "Completed"
    usual = state.result()
    assert usual["rows"] == pq.read_metadata(test_split).num_rows and not usual["drift_warning"]
    assert (usual["model_uri"], usual["model_version"]) == ("models:/clf@champion", "1")  # the alias, resolved
    # against the test documents read as scoring reads them: the same population, so next to no drift
    assert (
        usual["drift"]["reference"] == "clf v1's test documents"
        and usual["drift"]["reference_examples"] == usual["rows"]
    )
    assert usual["drift"]["label_psi"] < 0.1 and usual["drift"]["confidence_psi"] < 0.1
    artifacts = prefect_artifacts(state.state_details.flow_run_id)
    assert "gptcore-drift" not in artifacts and f"# Scoring: {usual['rows']} rows" in artifacts["gptcore-scoring"]

    shifted = tmp_path / "sea_only.jsonl"
    shifted.write_text("".join(json.dumps({"text": t}) + "\n" for t in topic_texts(40, topics=("sea",), seed=1)))
    state = scoring_flow(
        input_path=str(shifted), output_path=str(tmp_path / "sea_scores.parquet"), **common, return_state=True
    )
    assert state.is_completed() and state.name == "DriftWarning"
    drifted = state.result()
    assert drifted["drift_warning"] and drifted["drift"]["label_psi"] > 0.25
    assert drifted["label_shares"]["sea"] > 0.9 and "label PSI" in state.message
    report = prefect_artifacts(state.state_details.flow_run_id)["gptcore-drift"]
    assert f"| predicted labels | {drifted['drift']['label_psi']:.3f} | 0.25 |" in report
    assert f"| sea | {drifted['label_counts']['sea']} | {drifted['label_shares']['sea']:.1%} |" in report

    client = mlflow_tracking.client()
    runs = client.search_runs(
        [mlflow_tracking.experiment_id()], "tags.`gptcore.stage` = 'score'", order_by=["attributes.start_time ASC"]
    )
    assert [r.data.tags["gptcore.drift_warning"] for r in runs] == ["false", "true"]
    assert [r.data.tags["gptcore.model_version"] for r in runs] == ["1", "1"]
    metrics = runs[1].data.metrics
    assert metrics["drift/label_psi"] == pytest.approx(drifted["drift"]["label_psi"])
    assert metrics["predicted_share/sea"] == pytest.approx(drifted["label_shares"]["sea"])
    assert 0 < metrics["confidence/p10"] <= metrics["confidence/p50"] <= metrics["confidence/p90"] <= 1
    assert metrics["input_tokens/max"] >= metrics["input_tokens/p50"] > 0 and metrics["input_chars/mean"] > 0
