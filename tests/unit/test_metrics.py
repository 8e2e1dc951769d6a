import math

import numpy as np
import pytest

from gptcore.metrics import (
    bits_per_byte,
    bootstrap_intervals,
    class_stats,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    majority_baseline,
    paired_bootstrap,
    unigram_nats,
)


def one_hot(pred, k):
    probs = np.zeros((len(pred), k))
    probs[np.arange(len(pred)), pred] = 1
    return probs


def test_report_matches_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 2])
    r = classification_report(y_true, one_hot(y_pred, 3), ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    a, b = r["per_class"]["a"], r["per_class"]["b"]
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert b["precision"] == pytest.approx(1 / 2) and b["recall"] == pytest.approx(1 / 2)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_never_predicted_class_has_zero_precision_not_nan():
    r = classification_report(np.array([0, 1]), one_hot(np.array([0, 0]), 2), ["a", "b"])
    assert r["per_class"]["b"]["precision"] == 0.0 and r["per_class"]["b"]["f1"] == 0.0
    assert not math.isnan(r["macro_f1"])


def test_majority_baseline_predicts_most_frequent_train_class():
    b = majority_baseline(np.array([1, 1, 0]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert b["majority_class"] == "b"
    assert b["accuracy"] == pytest.approx(0.75)
    assert b["macro_f1"] == pytest.approx((0 + 2 * 0.75 / 1.75) / 2)


def test_confusion_matrix_counts():
    assert confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 1]), 2).tolist() == [[0, 1], [0, 2]]


def test_bits_per_byte_and_unigram():
    assert bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)
    # uniform counts over 4 ids (after add-one smoothing of equal counts): 2 bits per token
    nats = unigram_nats(np.array([1, 1, 1, 1]), np.array([0, 1]))
    assert nats == pytest.approx(2 * math.log(4))


def test_expected_calibration_error_is_the_gap_between_confidence_and_accuracy():
    y_true = np.array([0] * 10)
    confident = np.tile([0.9, 0.1], (10, 1))
    assert expected_calibration_error(y_true, confident) == pytest.approx(0.1)  # 90% sure, always right
    half_wrong = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(half_wrong, confident) == pytest.approx(0.4)
    calibrated = np.array([0] * 9 + [1])
    assert expected_calibration_error(calibrated, confident) == pytest.approx(0.0, abs=1e-12)
    assert classification_report(half_wrong, confident, ["a", "b"])["ece"] == pytest.approx(0.4)


def test_batched_class_stats_equal_the_report_of_each_confusion_matrix():
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 4, size=(6, 50)), rng.integers(0, 3, size=(6, 50))  # class 3 never predicted
    cms = np.stack([confusion_matrix(t, p, 4) for t, p in zip(y_true, y_pred)])
    batched = class_stats(cms)
    for i in range(6):
        report = classification_report(y_true[i], one_hot(y_pred[i], 4), list("abcd"))
        assert batched["accuracy"][i] == pytest.approx(report["accuracy"])
        assert batched["macro_f1"][i] == pytest.approx(report["macro_f1"])
        assert batched["f1"][i].tolist() == pytest.approx([report["per_class"][c]["f1"] for c in "abcd"])


def test_bootstrap_intervals_hold_the_estimate_narrow_with_more_data_and_repeat_by_seed():
    rng = np.random.default_rng(0)

    def noisy(n):
        y_true = rng.integers(0, 3, size=n)
        y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, 3, size=n))
        probs = np.full((n, 3), 0.1)
        probs[np.arange(n), y_pred] = 0.8
        return y_true, probs

    small, large = noisy(200), noisy(3200)
    ci_small, ci_large = (bootstrap_intervals(*data, ["a", "b", "c"], resamples=500) for data in (small, large))
    for data, ci in ((small, ci_small), (large, ci_large)):
        report = classification_report(*data, ["a", "b", "c"])
        for name in ("accuracy", "macro_f1", "ece"):
            assert ci[name][0] <= report[name] <= ci[name][1], name
        for c in "abc":
            low, high = ci["per_class"][c]["recall"]
            assert 0 <= low <= report["per_class"][c]["recall"] <= high <= 1
    width = lambda ci: ci["macro_f1"][1] - ci["macro_f1"][0]  # noqa: E731
    assert 0.15 < width(ci_large) / width(ci_small) < 0.4  # ~1/sqrt(16)
    assert bootstrap_intervals(*small, ["a", "b", "c"], resamples=500) == ci_small
    assert bootstrap_intervals(*small, ["a", "b", "c"], resamples=500, seed=1) != ci_small


def _predictions(y_true: np.ndarray, right: float, seed: int) -> np.ndarray:
    """Probabilities of a model that is right on a `right` share of the examples (0.7 confident)."""
    rng = np.random.default_rng(seed)
    y_pred = np.where(rng.random(len(y_true)) < right, y_true, (y_true + 1) % 3)
    probs = np.full((len(y_true), 3), 0.15)
    probs[np.arange(len(y_true)), y_pred] = 0.7
    return probs


def test_paired_bootstrap_separates_a_better_model_from_noise():
    y_true = np.random.default_rng(0).integers(0, 3, size=600)
    base = _predictions(y_true, 0.6, seed=1)
    better = paired_bootstrap(y_true, base, _predictions(y_true, 0.8, seed=2), 3)
    assert better["macro_f1"]["delta"] > 0.1 and better["macro_f1"]["ci"][0] > 0
    assert better["accuracy"]["ci"][0] > 0
    same = paired_bootstrap(y_true, base, base.copy(), 3)
    assert same["macro_f1"] == {"delta": 0.0, "ci": [0.0, 0.0]}
    flipped = base.copy()  # one example more right: a difference far inside the noise
    wrong = np.flatnonzero(base.argmax(1) != y_true)[0]
    flipped[wrong] = np.roll(flipped[wrong], y_true[wrong] - flipped[wrong].argmax())
    tie = paired_bootstrap(y_true, base, flipped, 3)
    assert tie["accuracy"]["delta"] == pytest.approx(1 / 600)
    assert tie["macro_f1"]["ci"][0] <= 0 <= tie["macro_f1"]["ci"][1]
