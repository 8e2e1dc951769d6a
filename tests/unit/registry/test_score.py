"""The scoring stage's drift monitor: population stability index, the confidence bins, and the
reference each registered version keeps (in a real SQLite MLflow store)."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gptcore.metrics import population_stability_index
from gptcore.registry.drift import confidence_histogram


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


def test_scoring_reference_is_the_test_split_as_the_onnx_classifier_scores_it(
    classifier_evaluation, onnx_classifier, trained
):
    from gptcore.results import read_scoring_reference

    kept = classifier_evaluation.test["scoring_reference"]
    reference = read_scoring_reference(Path(classifier_evaluation.metrics_path).parent / kept["file"])
    texts = pq.read_table(trained["data"] / "test.parquet").column("text").to_pylist()
    assert (
        kept["documents"] == len(texts) < classifier_evaluation.test["predictions"]["examples"]
    )  # documents, not passages
    np.testing.assert_allclose(reference, onnx_classifier.predict_proba(texts), atol=1e-4)


def test_a_version_registered_without_a_scoring_reference_drifts_against_its_test_passages(
    trained, classifier_package, classifier_evaluation, mlflow_tracking, tmp_path, caplog
):
    from gptcore.layout import SCORING_REFERENCE_TAG
    from gptcore.registry.register import register
    from gptcore.registry.score import score

    # the evaluation as it was before scoring references were kept
    old = json.loads(Path(classifier_evaluation.metrics_path).read_text())
    del old["test"]["scoring_reference"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "classifier_eval.json").write_text(json.dumps(old))
    shutil.copy(Path(classifier_evaluation.metrics_path).parent / old["test"]["predictions"]["file"], tmp_path / "eval")
    version = register(
        classifier_package.package_dir, tmp_path / "eval" / "classifier_eval.json", "clf", mlflow_tracking
    ).version
    assert SCORING_REFERENCE_TAG not in mlflow_tracking.client().get_model_version("clf", version).tags
    with caplog.at_level(logging.INFO, logger="gptcore"):
        result = score(
            "models:/clf@champion", trained["data"] / "test.parquet", tmp_path / "out.parquet", tracking=mlflow_tracking
        )
    assert result.drift["reference"] == "clf v1's test passages"
    assert result.drift["reference_examples"] == old["test"]["predictions"]["examples"]
    assert "clf v1 has no scoring reference" in caplog.text
