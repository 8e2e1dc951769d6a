"""Monitoring a batch-scoring run: what the model predicted, how sure it was, on what inputs, and
how far that lies from what the same model predicted on its own test split.

Drift is the population stability index (`gptcore.metrics.population_stability_index`) of two
distributions against the test-set predictions kept with the registered version: the shares of
the predicted labels, and the confidences (top probabilities) in CONFIDENCE_BINS equal bins over
[1/K, 1], the range a top probability of K classes can take. The reference is the evaluation's
scoring reference (classifier_scoring_reference.npz): each test document read as scoring reads
it, its first block_size tokens, so scoring the test split itself shows no drift. Versions
registered before those were kept fall back to the test predictions (classifier_predictions.npz),
over passages of the fine-tuning's `passage_tokens` tokens: another length of input, which can
shift the confidences without any change of topic.

Torch-free: numpy and pyarrow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptcore.metrics import population_stability_index

CONFIDENCE_BINS = 10


def distribution(values: np.ndarray, keys: tuple[str, ...]) -> dict[str, float]:
    """The summary figures `keys` (mean, max, pNN percentiles) of `values`; zeros when there are none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return dict.fromkeys(keys, 0.0)
    figures = {"mean": lambda: values.mean(), "max": lambda: values.max()}
    return {k: float(figures[k]() if k in figures else np.percentile(values, int(k[1:]))) for k in keys}


def confidence_histogram(confidence: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of the confidences in CONFIDENCE_BINS equal bins over [1/K, 1] (the ends inclusive)."""
    edges = np.linspace(1.0 / num_classes, 1.0, CONFIDENCE_BINS + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, CONFIDENCE_BINS - 1)
    return np.bincount(which, minlength=CONFIDENCE_BINS)


def output_stats(output_path: str | Path, text_column: str, labels: list[str]) -> dict:
    """Label shares, confidence and input-length figures of a scoring output, read a batch at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = dict.fromkeys(labels, 0)
    confidence, chars, tokens = [], [], []
    for batch in pq.ParquetFile(output_path).iter_batches(columns=[text_column, "label", "confidence", "token_count"]):
        for label, n in zip(*np.unique(batch.column("label").to_numpy(zero_copy_only=False), return_counts=True)):
            counts[str(label)] += int(n)
        confidence.append(batch.column("confidence").to_numpy())
        chars.append(pc.utf8_length(batch.column(text_column)).to_numpy())
        tokens.append(batch.column("token_count").to_numpy())
    confidence, chars, tokens = (np.concatenate(x) if x else np.zeros(0) for x in (confidence, chars, tokens))
    rows = len(confidence)
    return {
        "rows": rows,
        "label_counts": counts,
        "label_shares": {label: n / max(rows, 1) for label, n in counts.items()},
        "confidence": distribution(confidence, ("mean", "p10", "p50", "p90")),
        "confidence_histogram": confidence_histogram(confidence, len(labels)).tolist(),
        "input_chars": distribution(chars, ("mean", "p50", "p90", "max")),
        "input_tokens": distribution(tokens, ("mean", "p50", "p90", "max")),
    }


def drift_report(stats: dict, reference_probs: np.ndarray, labels: list[str], threshold: float, source: str) -> dict:
    """PSI of the run's predicted labels and confidences against the test-set probabilities (N, K)."""
    k = len(labels)
    reference_counts = np.bincount(reference_probs.argmax(axis=1), minlength=k)
    reference_histogram = confidence_histogram(reference_probs.max(axis=1), k)
    label_psi = population_stability_index(reference_counts, [stats["label_counts"][label] for label in labels])
    confidence_psi = population_stability_index(reference_histogram, stats["confidence_histogram"])
    return {
        "label_psi": label_psi,
        "confidence_psi": confidence_psi,
        "threshold": threshold,
        "warning": max(label_psi, confidence_psi) > threshold,
        "reference": source,
        "reference_examples": len(reference_probs),
        "reference_label_shares": dict(zip(labels, (reference_counts / len(reference_probs)).tolist())),
        "reference_confidence_histogram": reference_histogram.tolist(),
    }
