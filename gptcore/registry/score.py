"""Batch scoring as a pipeline stage: a registered (or local) classifier over a file of texts, monitored.

The work itself is `gptcore.runtime.score_file` (torch-free, chunked, resumable); this stage
resolves the model through the tracking settings and logs what it scored to MLflow: the
predicted-label shares, confidence and input-length figures, and the drift of the predictions
from the registered version's own predictions on its test split (`gptcore.registry.drift`), flagged
when a population stability index passes `score.drift_threshold`. The reference is the version's
scoring reference (each test document read as scoring reads it); a version registered before
those were kept falls back to its test passages' predictions.

A run resolves an alias (`models:/NAME@champion`) once, to the version it names at the start, and
uses that version for everything: the package it scores with, the drift reference, the MLflow
run's tags and the result; an alias moved during the run changes nothing in it. A run holds the
lock on its output (`gptcore.locks`), so a second run onto the same output is refused instead of
mixing its rows into the first's.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptcore.config import ScoreConfig
from gptcore.errors import InputError
from gptcore.layout import PREDICTIONS_TAG, SCORING_REFERENCE_TAG
from gptcore.locks import output_lock
from gptcore.registry.drift import drift_report, output_stats
from gptcore.registry.promotion import version_artifact
from gptcore.results import read_predictions, read_scoring_reference
from gptcore.runtime import OnnxClassifier, load_model, score_file
from gptcore.runtime.package import model_version
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.score")


@dataclass
class ScoreResult:
    output_path: str
    rows: int
    model_uri: str  # as asked for: an alias, a version or a package directory
    model_version: str | None  # the registered version it resolved to at the start (None: a package directory)
    provider: str
    label_counts: dict[str, int]
    seconds: float
    chunks: int
    chunks_skipped: int  # scored by an interrupted earlier run and kept
    label_shares: dict[str, float]
    confidence: dict[str, float]  # mean, p10, p50, p90
    input_chars: dict[str, float]  # mean, p50, p90, max
    input_tokens: dict[str, float]  # mean, p50, p90, max (whole texts: the model reads the first block_size)
    drift: dict | None  # `gptcore.registry.drift.drift_report`; None without test-set predictions to compare with
    drift_warning: bool


def resolve_version(model_uri: str, tracking: Tracking | None):
    """The registered version (an MLflow ModelVersion) `models:/NAME@ALIAS` or `models:/NAME/N` names
    now; None for a package directory or a runs:/ URI."""
    if not str(model_uri).startswith("models:/"):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = tracking.client() if tracking else MlflowClient()  # no settings: MLflow's own, as load_model's
    try:
        return model_version(client, str(model_uri))
    except MlflowException as e:
        raise InputError(f"{model_uri}: cannot be resolved: {e.message}") from None


def drift_reference(version, tracking: Tracking | None) -> tuple[np.ndarray, str] | None:
    """The (N, K) test-set probabilities kept with the registered `version`, and what they are: its
    scoring reference, else its test passages' predictions; None without a version (a package
    directory) or tracking, or for a version registered without either."""
    if tracking is None or version is None:
        return None
    what = f"{version.name} v{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        path = version_artifact(tracking, version, SCORING_REFERENCE_TAG, Path(tmp))
        if path is not None:
            return read_scoring_reference(path), f"{what}'s test documents"
        path = version_artifact(tracking, version, PREDICTIONS_TAG, Path(tmp))
        if path is None:
            return None
        _, probs = read_predictions(path)
    log.info(
        "score: %s has no scoring reference (registered before they were kept): drift is measured against "
        "its test predictions, over passages of the fine-tuning's length where scoring reads each text's first "
        "block_size tokens, so the figures may differ without any drift",
        what,
    )
    return probs, f"{what}'s test passages"


def metric_name(label: str) -> str:
    """A label as MLflow accepts it in a metric name."""
    return re.sub(r"[^\w\-. /]", "_", label)


def score(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    text_field: str = "text",
    tracking: Tracking | None = None,
    cfg: ScoreConfig | None = None,
    device: str = "auto",
) -> ScoreResult:
    """Classify every row of `input_path` (.parquet/.jsonl/.csv) into Parquet at `output_path`,
    resuming an interrupted run of the same work, and report how the predictions are distributed.

    Raises LockedError, naming the holder, while another run writes `output_path`.
    """
    cfg = cfg or ScoreConfig()
    with output_lock(output_path, f"scoring of {input_path} with {model_uri}"):
        return _score(model_uri, input_path, output_path, text_field, tracking, cfg, device)


def _score(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    text_field: str,
    tracking: Tracking | None,
    cfg: ScoreConfig,
    device: str,
) -> ScoreResult:
    start = time.perf_counter()
    settings = tracking.settings if tracking else None
    version = resolve_version(model_uri, tracking)
    # The version itself from here on: the alias may move while this run scores.
    used_uri = model_uri if version is None else f"models:/{version.name}/{version.version}"
    model = load_model(
        used_uri,
        device=device,
        tracking_uri=settings and settings.tracking_uri,
        registry_uri=settings and settings.registry_uri,
    )
    if not isinstance(model, OnnxClassifier):
        raise InputError(f"{model_uri}: is a language model; scoring needs a classifier")
    labels = model.labels
    tags = {"gptcore.model_uri": model_uri}
    if version is not None:
        tags |= {"gptcore.model_version": str(version.version), "gptcore.model_version_uri": used_uri}
    with stage_run(tracking, "score", tags=tags) as run:
        scored = score_file(model, input_path, output_path, text_field, cfg.batch_size, cfg.chunk_rows)
        stats = output_stats(scored.output_path, scored.text_column, labels)
        reference = drift_reference(version, tracking)
        drift = None
        if reference is None:
            log.info("score: no drift figures: no test-set predictions of %s to compare with", used_uri)
        elif reference[0].shape[1] != len(labels):
            log.warning(
                "score: no drift figures: the reference (%s) has %d classes, the model %d",
                reference[1],
                reference[0].shape[1],
                len(labels),
            )
        elif scored.rows:
            drift = drift_report(stats, reference[0], labels, cfg.drift_threshold, reference[1])
        result = ScoreResult(
            output_path=str(output_path),
            rows=scored.rows,
            model_uri=model_uri,
            model_version=None if version is None else str(version.version),
            provider=model.provider,
            label_counts=stats["label_counts"],
            seconds=time.perf_counter() - start,
            chunks=scored.chunks,
            chunks_skipped=scored.chunks_skipped,
            label_shares=stats["label_shares"],
            confidence=stats["confidence"],
            input_chars=stats["input_chars"],
            input_tokens=stats["input_tokens"],
            drift=drift,
            drift_warning=bool(drift and drift["warning"]),
        )
        run.log_params(
            {
                "input": str(input_path),
                "output": str(output_path),
                "model": used_uri,
                "provider": model.provider,
                "text_field": text_field,
                **{f"score.{k}": v for k, v in asdict(cfg).items()},
            }
        )
        metrics = {
            "score/rows": result.rows,
            "score/rows_per_s": result.rows / result.seconds,
            "score/chunks_skipped": result.chunks_skipped,
            "drift/warning": float(result.drift_warning),
        }
        metrics |= {f"predicted/{metric_name(k)}": v for k, v in result.label_counts.items()}
        metrics |= {f"predicted_share/{metric_name(k)}": v for k, v in result.label_shares.items()}
        for name in ("confidence", "input_chars", "input_tokens"):
            metrics |= {f"{name}/{k}": v for k, v in getattr(result, name).items()}
        if drift is not None:
            metrics |= {"drift/label_psi": drift["label_psi"], "drift/confidence_psi": drift["confidence_psi"]}
        run.log_metrics(metrics)
        run.set_tags({"gptcore.drift_warning": str(result.drift_warning).lower()})
        run.log_dict(stats | {"drift": drift}, "monitoring.json")
    log.info(
        "score: %d rows of %s -> %s with %s on %s in %.1fs",
        result.rows,
        input_path,
        output_path,
        model_uri if used_uri == model_uri else f"{model_uri} ({used_uri})",
        model.provider,
        result.seconds,
    )
    if result.drift_warning:
        log.warning(
            "score: DRIFT against %s: label PSI %.3f, confidence PSI %.3f (threshold %s); predicted shares %s "
            "vs %s on the test set",
            drift["reference"],
            drift["label_psi"],
            drift["confidence_psi"],
            drift["threshold"],
            _shares(result.label_shares),
            _shares(drift["reference_label_shares"]),
        )
    elif drift is not None:
        log.info(
            "score: no drift: label PSI %.3f, confidence PSI %.3f (threshold %s)",
            drift["label_psi"],
            drift["confidence_psi"],
            drift["threshold"],
        )
    return result


def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{label} {share:.0%}" for label, share in shares.items())
