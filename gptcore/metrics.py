"""Metrics in plain numpy (no torch): classification reports with bootstrap intervals, the per-token
negative log-likelihood, and bits per byte, pooled and per document.

Confidence intervals are percentile bootstrap intervals: the test examples are resampled with
replacement and every statistic is recomputed from each resample's confusion matrix, all
resamples at once. Bits per byte divides the summed negative log-likelihood (nats) by ln 2 and
by the UTF-8 bytes the predicted tokens stand for, so models with different tokenizers compare
on one scale.

Per-document bits per byte scores each document on its own, the way the model met documents in
training: after an <|endoftext|>, up to and including its closing <|endoftext|> (which costs
nats but stands for no bytes). A document longer than the context is read through windows of
block_size tokens that slide by half a block, each scoring only the targets the previous one
did not: every target past the first window sees between block_size/2 and block_size tokens of
its own document, for about twice the cost of scoring it once. Documents never see each other,
so a document's figure depends neither on its neighbours nor on the order of the split. The
PyTorch evaluation and the ONNX runtime score through the same windows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np

# A target that carries no loss (padding, a prompt's tokens, a position not scored); the same in
# the PyTorch loss (`gptcore.model.token_nll`) and here.
IGNORE_INDEX = -100
# Floats of logits one batch may hold (64 MB in float32): rows per batch shrink as windows and
# the vocabulary grow, so a 50k vocabulary at block_size 1024 still fits a small machine.
LOGITS_BUDGET = 1 << 24


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, expected calibration error, per-class precision/recall/F1/support, confusion matrix.

    `probs` is (N, K); a class never predicted has precision 0, a class absent from `y_true`
    is left out of the macro average (it has no recall to speak of).
    """
    y_true = np.asarray(y_true)
    cm = confusion_matrix(y_true, np.asarray(probs).argmax(axis=1), len(labels))
    stats = class_stats(cm)
    return {
        "accuracy": float(stats["accuracy"]),
        "macro_f1": float(stats["macro_f1"]),
        "ece": expected_calibration_error(y_true, probs) if len(y_true) else 0.0,
        "per_class": {
            label: {
                "precision": float(stats["precision"][k]),
                "recall": float(stats["recall"][k]),
                "f1": float(stats["f1"][k]),
                "support": int(cm[k].sum()),
            }
            for k, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }


def class_stats(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and per-class precision/recall/F1 of confusion matrices (..., K, K)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    predicted, support = cm.sum(axis=-2), cm.sum(axis=-1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    macro_f1 = np.divide((f1 * present).sum(-1), present.sum(-1), out=np.zeros(tp.shape[:-1]), where=present.any(-1))
    return {
        "accuracy": tp.sum(-1) / np.maximum(cm.sum((-2, -1)), 1),
        "macro_f1": macro_f1,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """|accuracy - confidence| per equal-width confidence bin, averaged with the bins' weights."""
    return float(
        _ece(np.asarray(y_true)[None], np.asarray(probs).max(1)[None], np.asarray(probs).argmax(1)[None], bins)[0]
    )


def _ece(y_true: np.ndarray, confidence: np.ndarray, y_pred: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of (B, N) arrays."""
    b, n = y_true.shape
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1) + bins * np.arange(b)[:, None]
    correct = np.bincount(which.ravel(), (y_true == y_pred).ravel(), b * bins).reshape(b, bins)
    confident = np.bincount(which.ravel(), confidence.ravel(), b * bins).reshape(b, bins)
    return np.abs(correct - confident).sum(1) / n


def _resampled(y_true: np.ndarray, probs: np.ndarray, idx: np.ndarray, k: int, bins: int) -> dict[str, np.ndarray]:
    """Every statistic of `class_stats` plus ECE, for each row of resample indices idx (B, N)."""
    y_pred, confidence = probs.argmax(1), probs.max(1)
    b = idx.shape[0]
    cells = (y_true[idx] * k + y_pred[idx]) + (k * k) * np.arange(b)[:, None]
    cm = np.bincount(cells.ravel(), minlength=b * k * k).reshape(b, k, k)
    return class_stats(cm) | {"ece": _ece(y_true[idx], confidence[idx], y_pred[idx], bins)}


def _resamples(n: int, resamples: int, seed: int):
    """Resample indices (B, N), 200 resamples at a time to bound the memory."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 200):
        yield rng.integers(0, n, size=(min(200, resamples - start), n))


def bootstrap_intervals(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bins: int = 15,
) -> dict:
    """Percentile intervals [low, high] of accuracy, macro-F1, ECE and per-class precision/recall/F1."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    draws: dict[str, list[np.ndarray]] = {}
    for idx in _resamples(len(y_true), resamples, seed):
        for name, values in _resampled(y_true, probs, idx, len(labels), bins).items():
            draws.setdefault(name, []).append(values)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    bounds = {name: np.percentile(np.concatenate(v), q, axis=0) for name, v in draws.items()}
    return {
        **{name: bounds[name].tolist() for name in ("accuracy", "macro_f1", "ece")},
        "per_class": {
            label: {m: bounds[m][:, j].tolist() for m in ("precision", "recall", "f1")}
            for j, label in enumerate(labels)
        },
        "level": level,
        "resamples": resamples,
    }


def paired_bootstrap(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    num_classes: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bins: int = 15,
) -> dict:
    """b minus a on the same examples: per metric (accuracy, macro_f1, ece) the difference and its interval.

    Both models are scored on the same resample each time, so what the examples have in common
    cancels and only the models' difference is left to vary.
    """
    y_true, probs_a, probs_b = np.asarray(y_true), np.asarray(probs_a), np.asarray(probs_b)
    whole = np.arange(len(y_true))[None]  # the examples as they are: one "resample" of all of them
    a, b = (_resampled(y_true, probs, whole, num_classes, bins) for probs in (probs_a, probs_b))
    point = {m: float(b[m][0] - a[m][0]) for m in ("accuracy", "macro_f1", "ece")}
    deltas: dict[str, list[np.ndarray]] = {m: [] for m in point}
    for idx in _resamples(len(y_true), resamples, seed):
        a = _resampled(y_true, probs_a, idx, num_classes, bins)
        b = _resampled(y_true, probs_b, idx, num_classes, bins)
        for m in deltas:
            deltas[m].append(b[m] - a[m])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {m: {"delta": point[m], "ci": np.percentile(np.concatenate(d), q).tolist()} for m, d in deltas.items()}


def paired_bpb_bootstrap(
    nats_a: np.ndarray,
    nats_b: np.ndarray,
    n_bytes: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """a's bits per byte minus b's (the reduction b brings) on the same documents, and its interval;
    and b's bits per byte over a's (`ratio`, e.g. a student's over its teacher's), with its interval.

    Per document: each model's summed NLL in nats, and the document's bytes. Each resample pools
    its documents' nats and bytes, as the test bits per byte pools the split: a document weighs
    by its length, so a one-line document cannot swing the verdict like a whole scene.
    """
    nats_a, nats_b, n_bytes = (np.asarray(x, dtype=np.float64) for x in (nats_a, nats_b, n_bytes))
    scale = math.log(2)
    bpb_a, bpb_b = nats_a.sum() / scale / n_bytes.sum(), nats_b.sum() / scale / n_bytes.sum()
    deltas, ratios = [], []
    for idx in _resamples(len(n_bytes), resamples, seed):
        a, b = nats_a[idx].sum(1), nats_b[idx].sum(1)
        deltas.append((a - b) / scale / n_bytes[idx].sum(1))
        ratios.append(b / a)  # the same bytes under both: the ratio of bits per byte is that of nats
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {
        "bpb": {"a": float(bpb_a), "b": float(bpb_b)},
        "reduction": {"delta": float(bpb_a - bpb_b), "ci": np.percentile(np.concatenate(deltas), q).tolist()},
        "ratio": {"value": float(bpb_b / bpb_a), "ci": np.percentile(np.concatenate(ratios), q).tolist()},
        "documents": len(n_bytes),
        "level": level,
        "resamples": resamples,
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


def population_stability_index(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """How far the distribution `actual` moved from `expected`: both counts (or shares) over the same bins.

        PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

    where a_i and e_i are bin i's shares of each, a share below `eps` counting as `eps` (an empty
    bin would make the logarithm infinite). PSI is 0 for identical distributions and symmetric in
    the two. The usual reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one.
    """
    expected, actual = (np.asarray(x, dtype=np.float64) for x in (expected, actual))
    if expected.shape != actual.shape or expected.ndim != 1:
        raise ValueError(f"expected and actual must be 1-D over the same bins, got {expected.shape} and {actual.shape}")
    if (expected < 0).any() or (actual < 0).any() or expected.sum() <= 0 or actual.sum() <= 0:
        raise ValueError("expected and actual must be non-negative with a positive total")
    e = np.maximum(expected / expected.sum(), eps)
    a = np.maximum(actual / actual.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(..., V) logits over the tokenizer's vocabulary, (...) targets -> (...) NLL in nats, 0 where
    the target is IGNORE_INDEX. The numpy twin of `gptcore.model.token_nll` (for ONNX Runtime's logits)."""
    logits = np.asarray(logits)  # float32 from ONNX Runtime: the (B, T, V) temporaries stay half the size
    peak = logits.max(axis=-1, keepdims=True)
    log_z = (np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]).astype(np.float64)
    scored = targets != IGNORE_INDEX
    picked = np.take_along_axis(logits, np.where(scored, targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(scored, log_z - picked, 0.0)


def document_windows(docs: Sequence[np.ndarray], eot_id: int, block_size: int) -> list[tuple[np.ndarray, int, int]]:
    """(window of up to block_size + 1 ids, how many of its last targets to score, document index)."""
    stride = max(1, block_size // 2)
    windows = []
    for d, doc in enumerate(docs):
        seq = np.concatenate([[eot_id], doc, [eot_id]]).astype(np.int64)
        n, end = len(seq) - 1, min(block_size, len(seq) - 1)
        windows.append((seq[: end + 1], end, d))
        while end < n:
            new_end = min(end + stride, n)
            windows.append((seq[new_end - block_size : new_end + 1], new_end - end, d))
            end = new_end
    return windows


def score_documents(
    docs: Sequence[np.ndarray],
    eot_id: int,
    block_size: int,
    vocab_size: int,
    nll_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Summed NLL (nats) of each document's targets.

    `nll_fn(inputs, targets)` takes (B, W) ids and next-token targets (IGNORE_INDEX where not
    scored) and returns (B, W) NLLs, 0 where not scored. Inputs are right-padded: under causal
    attention padding after a position cannot change it.
    """
    windows = sorted(document_windows(docs, eot_id, block_size), key=lambda w: -len(w[0]))
    nats = np.zeros(len(docs), dtype=np.float64)
    i = 0
    while i < len(windows):
        width = len(windows[i][0]) - 1
        rows = windows[i : i + max(1, LOGITS_BUDGET // (width * vocab_size))]
        inputs = np.full((len(rows), width), eot_id, dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for r, (seq, scored, _) in enumerate(rows):
            inputs[r, : len(seq) - 1] = seq[:-1]
            targets[r, len(seq) - 1 - scored : len(seq) - 1] = seq[len(seq) - scored :]
        np.add.at(nats, [d for _, _, d in rows], np.asarray(nll_fn(inputs, targets), dtype=np.float64).sum(1))
        i += len(rows)
    return nats


def document_distribution(scores) -> dict:
    """Per-document bits per byte (a `gptcore.results.DocScores`) summarised, the pooled figure beside it."""
    bpb = scores.bpb
    p10, median, p90 = np.percentile(bpb, [10, 50, 90]).tolist()
    return {
        "documents": len(bpb),
        "mean": float(bpb.mean()),
        "median": median,
        "p10": p10,
        "p90": p90,
        "min": float(bpb.min()),
        "max": float(bpb.max()),
        "bpb": bits_per_byte(float(scores.nats.sum()), int(scores.bytes.sum())),
        "tokens": int(scores.tokens.sum()),
        "bytes": int(scores.bytes.sum()),
    }


def documents_digest(doc_ids: Sequence[str], texts: Sequence[str]) -> str:
    """A digest of the scored documents (ids and text), not of their tokens: bits per byte
    compares models across tokenizers, so pairing does too."""
    h = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts):
        h.update(f"{doc_id}\0{len(text)}\0{text}".encode())
    return h.hexdigest()
