"""Batch scoring as a Prefect flow: a registered classifier over a file of texts, with drift monitoring.

One task calls `gptcore.registry.score.score`: the pipeline's `score` task, which retries a transient
network failure with backoff (the model comes from MLflow); a retry resumes from the chunks
already scored. Every run publishes the markdown artifact `gptcore-scoring`; a run whose
predictions drifted from the model's test-set predictions (a PSI above the threshold) also
publishes `gptcore-drift` and ends in the Completed-type state named DriftWarning, so it stands
out in the UI and in automations without counting as a failure.

The alias in `model_uri` is resolved once per run, to the version that scores it; that version
is in the artifacts' descriptions, the flow's result (`model_version`) and the MLflow run's tags.
A run onto an output another run is writing fails at once, naming that run (`gptcore.locks`);
the deployment's concurrency limit (deploy/prefect.yaml) queues an hourly run behind a slow one
instead.

Deployment entrypoint: flows/scoring.py:scoring_flow.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from flows.summary import drift_markdown, scoring_markdown
from flows.tasks import flow_run_tags, gptcore_logs_to_prefect, score_task
from gptcore.config import ScoreConfig
from gptcore.tracking import Tracking, load_settings

DRIFT_STATE = "DriftWarning"


@flow(name="gptcore-scoring")
def scoring_flow(
    input_path: str,
    output_path: str,
    model_uri: str = "models:/gptcore-classifier@champion",
    text_field: str = "text",
    workdir: str = "gptcore-work",
    mlflow_config: str | None = None,
    drift_threshold: float | None = None,
) -> dict[str, Any] | State:
    """Classify every row of `input_path` into Parquet at `output_path` with `model_uri`; flag drift.

    MLflow settings come from `mlflow_config` (else as for the pipeline, `{workdir}` in them
    standing for `workdir`); `drift_threshold` overrides `score.drift_threshold`.
    """
    with gptcore_logs_to_prefect():
        cfg = ScoreConfig() if drift_threshold is None else ScoreConfig(drift_threshold=drift_threshold)
        tracking = Tracking(load_settings(workdir, mlflow_config), run_tags=flow_run_tags())
        result = score_task(model_uri, input_path, output_path, text_field, tracking, cfg)
    model = model_uri if result.model_version is None else f"{model_uri} (v{result.model_version})"
    create_markdown_artifact(
        scoring_markdown(result),
        key="gptcore-scoring",
        description=f"gptcore scoring: {result.rows} rows with {model}",
    )
    summary = asdict(result)
    if not result.drift_warning:
        return summary
    drift = result.drift
    message = (
        f"predictions drifted from {drift['reference']}: label PSI {drift['label_psi']:.3f}, confidence PSI "
        f"{drift['confidence_psi']:.3f}, threshold {drift['threshold']}"
    )
    get_run_logger().warning("%s", message)
    create_markdown_artifact(
        drift_markdown(result), key="gptcore-drift", description=f"gptcore drift warning: {model} on {input_path}"
    )
    return Completed(name=DRIFT_STATE, message=message, data=summary)
