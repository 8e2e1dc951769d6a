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
from typing import TYPE_CHECKING

import numpy as np

from gptcore.metrics import population_stability_index

if TYPE_CHECKING:
    from gptcore.score import ScoreResult

CONFIDENCE_BINS = 10


def distribution(values: np.ndarray, keys: tuple[str, ...]) -> dict[str, float]:
    """The summary figures `keys` (mean, max, pNN percentiles) of `values`; zeros when there are none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {k: 0.0 for k in keys}
    figures = {"mean": lambda: values.mean(), "max": lambda: values.max()}
    return {k: float(figures[k]() if k in figures else np.percentile(values, int(k[1:]))) for k in keys}


def read_scoring_reference(path: str | Path) -> np.ndarray:
    """(N, K) probabilities of the test documents as the evaluation stage wrote them; no pickle is loaded."""
    with np.load(path, allow_pickle=False) as f:
        return f["probs"]


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


def _label_rows(result: ScoreResult) -> str:
    drift = result.drift or {}
    test = drift.get("reference_label_shares", {})
    return "\n".join(f"| {label} | {result.label_counts[label]} | {share:.1%} | "
                     f"{format(test[label], '.1%') if label in test else 'n/a'} |"
                     for label, share in result.label_shares.items())


def scoring_markdown(result: ScoreResult) -> str:
    """A short report of one scoring run (a Prefect artifact)."""
    drift = result.drift
    verdict = ("no drift figures: the model has no test-set predictions to compare with" if drift is None else
               f"label PSI {drift['label_psi']:.3f}, confidence PSI {drift['confidence_psi']:.3f} against "
               f"{drift['reference']}: {'**above**' if drift['warning'] else 'within'} "
               f"the threshold {drift['threshold']}")
    c, chars, tokens = result.confidence, result.input_chars, result.input_tokens
    return (f"# Scoring: {result.rows} rows\n\n"
            f"- model `{result.model_uri}` on {result.provider}; output `{result.output_path}`\n"
            f"- {result.chunks} chunks ({result.chunks_skipped} kept from an interrupted run) "
            f"in {result.seconds:.1f} s\n"
            f"- confidence mean {c['mean']:.3f} (p10 {c['p10']:.3f}, p50 {c['p50']:.3f}, p90 {c['p90']:.3f})\n"
            f"- input length: characters mean {chars['mean']:.0f} (p50 {chars['p50']:.0f}, p90 {chars['p90']:.0f}, "
            f"max {chars['max']:.0f}); tokens mean {tokens['mean']:.0f} (p50 {tokens['p50']:.0f}, "
            f"p90 {tokens['p90']:.0f}, max {tokens['max']:.0f})\n"
            f"- drift: {verdict}\n\n"
            "| label | rows | share | share on the test set |\n|---|---|---|---|\n" + _label_rows(result))


def drift_markdown(result: ScoreResult) -> str:
    """Why a scoring run was flagged (a Prefect artifact): the PSI figures and the shares that moved."""
    drift = result.drift
    return (f"# Drift warning: `{result.model_uri}` on `{result.output_path}`\n\n"
            f"The predictions on these {result.rows} rows are distributed unlike the model's predictions on its "
            f"test set ({drift['reference']}, {drift['reference_examples']} examples).\n\n"
            "| population stability index | value | threshold |\n|---|---|---|\n"
            f"| predicted labels | {drift['label_psi']:.3f} | {drift['threshold']} |\n"
            f"| confidence ({CONFIDENCE_BINS} bins) | {drift['confidence_psi']:.3f} | {drift['threshold']} |\n\n"
            "PSI below 0.1 reads as stable, 0.1 to 0.25 as a moderate shift, above 0.25 as a major one. "
            "The inputs may come from another population than the training data (another topic, source or "
            "length), or the world moved: check a sample of the rows before trusting the labels.\n\n"
            "| label | rows | share now | share on the test set |\n|---|---|---|---|\n" + _label_rows(result)
            + f"\n\nconfidence mean now {result.confidence['mean']:.3f}; input tokens p50 "
              f"{result.input_tokens['p50']:.0f}, max {result.input_tokens['max']:.0f}")
