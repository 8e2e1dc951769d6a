"""Metrics in plain numpy (no torch): classification reports and bits per byte.

Bits per byte divides the summed negative log-likelihood (nats) by ln 2 and by the UTF-8 bytes
the predicted tokens stand for, so models with different tokenizers compare on one scale.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    `probs` is (N, K); a class never predicted has precision 0, a class absent from `y_true`
    is left out of the macro average (it has no recall to speak of).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(probs).argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                    "support": int(support[k])}
            for k, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }


def majority_baseline(train_labels: np.ndarray, y_true: np.ndarray, labels: list[str]) -> dict:
    """The report of always predicting the most frequent train class."""
    majority = int(np.bincount(train_labels, minlength=len(labels)).argmax())
    probs = np.zeros((len(y_true), len(labels)))
    probs[:, majority] = 1.0
    return {**classification_report(y_true, probs, labels), "majority_class": labels[majority]}


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / n_bytes


def unigram_nats(train_counts: np.ndarray, targets: np.ndarray) -> float:
    """Summed NLL (nats) of `targets` under add-one-smoothed unigram frequencies (train token counts per id)."""
    counts = np.asarray(train_counts, dtype=np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(targets, dtype=np.int64)].sum())
