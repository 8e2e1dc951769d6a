import math

import numpy as np
import pytest

from gptcore.metrics import bits_per_byte, classification_report, confusion_matrix, majority_baseline, unigram_nats


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
