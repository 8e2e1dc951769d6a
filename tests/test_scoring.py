"""Batch scoring: chunked and resumable in real ONNX Runtime sessions, drift by population stability
index, and the scoring flow on a local Prefect server with a classifier registered in a real
SQLite MLflow store."""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptcore.errors import InputError
from gptcore.metrics import population_stability_index
from gptcore.monitoring import confidence_histogram
from gptcore.runtime import load_model, score_file
from gptcore.runtime.scoring import parts_dir
from tests.conftest import WORDS
from tests.test_runtime import write_input


def topic_texts(n: int, topics=("sea", "land"), seed: int = 0) -> list[str]:
    """Texts of 12 words, each from one topic, the topics taking turns."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[topics[i % len(topics)]]) for _ in range(12)) for i in range(n)]


@pytest.fixture(scope="module")
def model(classifier_package):
    return load_model(classifier_package.package_dir, device="cpu", threads=1)


class Interrupted(Exception):
    pass


def stop_after(index: int):
    def on_chunk(i: int) -> None:
        if i == index:
            raise Interrupted
    return on_chunk


def input_file(tmp_path: Path, suffix: str, n: int = 45) -> Path:
    src = tmp_path / f"in{suffix}"
    labels = ["sea", "land"] * (n // 2) + ["sea"] * (n % 2)
    write_input(src, pa.table({"id": list(range(n)), "text": topic_texts(n), "label": labels}))
    return src


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_interrupted_run_resumes_with_finished_chunks_skipped(model, tmp_path, suffix, caplog):
    src = input_file(tmp_path, suffix)
    whole = score_file(model, src, tmp_path / "whole.parquet", chunk_rows=8)
    assert (whole.rows, whole.chunks, whole.chunks_skipped) == (45, 6, 0)

    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        score_file(model, src, out, chunk_rows=8, on_chunk=stop_after(2))
    assert not out.exists()  # never half-written
    assert sorted(p.name for p in parts_dir(out).glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]

    scored_now = []
    with caplog.at_level(logging.INFO, logger="gptcore"):
        resumed = score_file(model, src, out, chunk_rows=8, on_chunk=scored_now.append)
    assert (resumed.rows, resumed.chunks, resumed.chunks_skipped) == (45, 6, 3)
    assert scored_now == [3, 4, 5]
    assert "resuming: 3 chunks of 8 rows" in caplog.text
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))
    assert not parts_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "whole.parquet", "out.parquet"])


@pytest.mark.parametrize("suffix,first", [(".parquet", r"score: 8/45 rows \(18%\)"),
                                          (".jsonl", r"score: 8/~4\d rows \(1\d%\)")])
def test_progress_lines_give_rows_done_of_the_total_rate_and_eta(model, tmp_path, monkeypatch, caplog, suffix, first):
    import re

    from gptcore.runtime import scoring

    monkeypatch.setattr(scoring, "PROGRESS_SECONDS", 0.0)  # a line after every chunk, not every 10 s
    with caplog.at_level(logging.INFO, logger="gptcore"):
        score_file(model, input_file(tmp_path, suffix), tmp_path / "out.parquet", chunk_rows=8)
    lines = [r.getMessage() for r in caplog.records if "rows/s" in r.getMessage()]
    assert len(lines) == 7  # six chunks and the end (the total is estimated from bytes read for JSONL)
    assert re.match(first + r" \| [\d.]+ rows/s \| ETA \d+s$", lines[0]), lines[0]
    assert lines[-1].startswith("score: 45/45 rows (100%)")


def test_changed_input_model_or_chunking_starts_over(model, classifier_package, tmp_path, caplog):
    src, out = input_file(tmp_path, ".jsonl"), tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        score_file(model, src, out, chunk_rows=8, on_chunk=stop_after(1))

    # One text changed, same size, same mtime: only the content digest can tell.
    stat = src.stat()
    src.write_bytes(src.read_bytes().replace(b"wave", b"hill", 1))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    with pytest.raises(Interrupted), caplog.at_level(logging.INFO, logger="gptcore"):
        score_file(model, src, out, chunk_rows=8, on_chunk=stop_after(1))
    assert "(input_sha256 changed): starting over" in caplog.text

    other = shutil.copytree(classifier_package.package_dir, tmp_path / "other")
    meta = json.loads((other / "gptcore_model.json").read_text())
    (other / "gptcore_model.json").write_text(json.dumps(meta, indent=1))  # same model, other bytes: other identity
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptcore"):
        result = score_file(load_model(other, device="cpu", threads=1), src, out, chunk_rows=8)
    assert "(model_digest changed): starting over" in caplog.text
    assert result.chunks_skipped == 0

    fresh = score_file(model, src, tmp_path / "fresh.parquet", chunk_rows=8)
    assert pq.read_table(out).equals(pq.read_table(fresh.output_path))
    assert pq.read_table(out).column("text").to_pylist() != topic_texts(45)  # the changed text was scored

    with pytest.raises(Interrupted):
        score_file(model, src, out, chunk_rows=8, on_chunk=stop_after(1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptcore"):
        assert score_file(model, src, out, chunk_rows=10).chunks_skipped == 0
    assert "(chunk_rows changed): starting over" in caplog.text


KILLED_RUN = """
import os, signal, sys
from gptcore.runtime import load_model, score_file

def die(index):
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a machine going down

score_file(load_model(sys.argv[1], device="cpu", threads=1), sys.argv[2], sys.argv[3], chunk_rows=8, on_chunk=die)
"""


def test_killed_process_leaves_no_output_and_the_next_run_resumes(model, classifier_package, tmp_path):
    src, out = input_file(tmp_path, ".parquet"), tmp_path / "out.parquet"
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, str(classifier_package.package_dir), str(src), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet.parts"]
    resumed = score_file(model, src, out, chunk_rows=8)
    assert (resumed.chunks, resumed.chunks_skipped) == (6, 2)
    whole = score_file(model, src, tmp_path / "whole.parquet", chunk_rows=8)
    assert pq.read_table(out).equals(pq.read_table(whole.output_path))


def test_jsonl_chunks_typed_apart_join_and_errors_name_the_row(model, tmp_path):
    src = tmp_path / "in.jsonl"
    texts = topic_texts(20)
    # `note` is null throughout the first chunk and text later: a streaming reader that fixes
    # the types from its first block would fail here.
    src.write_text("".join(json.dumps({"text": t, "note": None if i < 8 else f"n{i}"}) + "\n"
                           for i, t in enumerate(texts)))
    scored = pq.read_table(score_file(model, src, tmp_path / "out.parquet", chunk_rows=8).output_path)
    assert scored.schema.field("note").type == pa.string()
    assert scored.column("note").to_pylist() == [None] * 8 + [f"n{i}" for i in range(8, 20)]
    assert scored.column("token_count").to_pylist() == [len(ids) for ids in model.token_ids(texts)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": None if i == 19 else t}) + "\n" for i, t in enumerate(texts)))
    with pytest.raises(InputError, match=r"bad\.jsonl: row 19 \(counting from 0\): column 'text' is null"):
        score_file(model, bad, tmp_path / "bad.parquet", chunk_rows=8)
    assert not (tmp_path / "bad.parquet").exists()


# --- population stability index ------------------------------------------------------------------


def test_psi_is_zero_for_one_distribution_and_matches_a_hand_computed_value():
    assert population_stability_index([30, 70], [3, 7]) == pytest.approx(0.0, abs=1e-12)  # counts or shares alike
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5
    assert population_stability_index([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * np.log(2) + 0.25 * np.log(1.5))
    assert population_stability_index([0.25, 0.75], [0.5, 0.5]) == pytest.approx(0.274653, abs=1e-6)  # symmetric


def test_psi_of_a_shift_is_major_and_an_empty_bin_stays_finite():
    assert population_stability_index([50, 50], [95, 5]) > 0.25
    assert population_stability_index([50, 50], [52, 48]) < 0.1
    empty = population_stability_index([100, 0], [50, 50])
    assert np.isfinite(empty) and empty > 1  # ln(0.5 / 1e-4) weighs the bin that was never seen
    with pytest.raises(ValueError, match="same bins"):
        population_stability_index([1, 2], [1, 2, 3])


def test_confidence_bins_span_the_possible_top_probabilities():
    counts = confidence_histogram(np.array([0.5, 0.549, 0.55, 0.999, 1.0]), num_classes=2)
    assert counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]


# --- the drift reference and the scoring flow ------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(trained, tmp_path_factory):
    from gptcore.evaluate import evaluate_classifier

    return evaluate_classifier(trained["ft"], trained["data"], trained["tokenizer"], tmp_path_factory.mktemp("eval"))


def test_scoring_reference_is_the_test_split_as_the_onnx_classifier_scores_it(evaluation, model, trained):
    from gptcore.monitoring import read_scoring_reference

    kept = evaluation.test["scoring_reference"]
    reference = read_scoring_reference(Path(evaluation.metrics_path).parent / kept["file"])
    texts = pq.read_table(trained["data"] / "test.parquet").column("text").to_pylist()
    assert kept["documents"] == len(texts) < evaluation.test["predictions"]["examples"]  # documents, not passages
    np.testing.assert_allclose(reference, model.predict_proba(texts), atol=1e-4)


def test_a_version_registered_without_a_scoring_reference_drifts_against_its_test_passages(
        trained, classifier_package, evaluation, mlflow_tracking, tmp_path, caplog):
    from gptcore.registry import SCORING_REFERENCE_TAG, register
    from gptcore.score import score

    # the evaluation as it was before scoring references were kept
    old = json.loads(Path(evaluation.metrics_path).read_text())
    del old["test"]["scoring_reference"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "classifier_eval.json").write_text(json.dumps(old))
    shutil.copy(Path(evaluation.metrics_path).parent / old["test"]["predictions"]["file"], tmp_path / "eval")
    version = register(classifier_package.package_dir, tmp_path / "eval" / "classifier_eval.json", "clf",
                       mlflow_tracking).version
    assert SCORING_REFERENCE_TAG not in mlflow_tracking.client().get_model_version("clf", version).tags
    with caplog.at_level(logging.INFO, logger="gptcore"):
        result = score("models:/clf@champion", trained["data"] / "test.parquet", tmp_path / "out.parquet",
                       tracking=mlflow_tracking)
    assert result.drift["reference"] == "clf v1's test passages"
    assert result.drift["reference_examples"] == old["test"]["predictions"]["examples"]
    assert "clf v1 has no scoring reference" in caplog.text


def test_scoring_flow_completes_on_the_test_split_and_warns_on_a_shifted_input(
        prefect_server, trained, classifier_package, evaluation, mlflow_tracking, tmp_path):
    from flows.scoring import scoring_flow
    from gptcore.registry import SCORING_REFERENCE_TAG, register
    from tests.test_pipeline import prefect_artifacts

    register(classifier_package.package_dir, evaluation.metrics_path, "clf", mlflow_tracking)
    assert mlflow_tracking.client().get_model_version("clf", "1").tags[SCORING_REFERENCE_TAG] == \
        "evaluation/classifier_scoring_reference.npz"
    settings = mlflow_tracking.settings
    config = tmp_path / "mlflow.yaml"
    config.write_text(f"tracking_uri: {settings.tracking_uri}\nartifact_location: {settings.artifact_location}\n"
                      f"experiment: {settings.experiment}\n")
    common = {"model_uri": "models:/clf@champion", "workdir": str(tmp_path / "w"), "mlflow_config": str(config)}

    test_split = trained["data"] / "test.parquet"
    state = scoring_flow(input_path=str(test_split), output_path=str(tmp_path / "test_scores.parquet"), **common,
                         return_state=True)
    assert state.is_completed() and state.name == "Completed"
    usual = state.result()
    assert usual["rows"] == pq.read_metadata(test_split).num_rows and not usual["drift_warning"]
    # against the test documents read as scoring reads them: the same population, so next to no drift
    assert usual["drift"]["reference"] == "clf v1's test documents" and usual["drift"]["reference_examples"] == usual["rows"]
    assert usual["drift"]["label_psi"] < 0.1 and usual["drift"]["confidence_psi"] < 0.1
    artifacts = prefect_artifacts(state.state_details.flow_run_id)
    assert "gptcore-drift" not in artifacts and f"# Scoring: {usual['rows']} rows" in artifacts["gptcore-scoring"]

    shifted = tmp_path / "sea_only.jsonl"
    shifted.write_text("".join(json.dumps({"text": t}) + "\n" for t in topic_texts(40, topics=("sea",), seed=1)))
    state = scoring_flow(input_path=str(shifted), output_path=str(tmp_path / "sea_scores.parquet"), **common,
                         return_state=True)
    assert state.is_completed() and state.name == "DriftWarning"
    drifted = state.result()
    assert drifted["drift_warning"] and drifted["drift"]["label_psi"] > 0.25
    assert drifted["label_shares"]["sea"] > 0.9 and "label PSI" in state.message
    report = prefect_artifacts(state.state_details.flow_run_id)["gptcore-drift"]
    assert f"| predicted labels | {drifted['drift']['label_psi']:.3f} | 0.25 |" in report
    assert f"| sea | {drifted['label_counts']['sea']} | {drifted['label_shares']['sea']:.1%} |" in report

    client = mlflow_tracking.client()
    runs = client.search_runs([mlflow_tracking.experiment_id()], "tags.`gptcore.stage` = 'score'",
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["gptcore.drift_warning"] for r in runs] == ["false", "true"]
    metrics = runs[1].data.metrics
    assert metrics["drift_label_psi"] == pytest.approx(drifted["drift"]["label_psi"])
    assert metrics["predicted_share_sea"] == pytest.approx(drifted["label_shares"]["sea"])
    assert 0 < metrics["confidence_p10"] <= metrics["confidence_p50"] <= metrics["confidence_p90"] <= 1
    assert metrics["input_tokens_max"] >= metrics["input_tokens_p50"] > 0 and metrics["input_chars_mean"] > 0
