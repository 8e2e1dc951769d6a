"""MLflow tracking in one place: settings, one run per stage, and the logging helpers stages use.

Runs are driven through `MlflowClient` with explicit run ids rather than MLflow's fluent
"active run", which is per thread: Prefect may run a task on another thread than its flow.
A stage given no `Tracking` logs nothing, so every stage is testable with tracking off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.errors import ConfigError

log = logging.getLogger("gptcore.tracking")

DEFAULT_SETTINGS = {
    "tracking_uri": "sqlite:///{workdir}/mlflow.db",
    "registry_uri": None,
    "artifact_location": "{workdir}/mlartifacts",
    "experiment": "gptcore",
}


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    registry_uri: str | None
    artifact_location: str | None
    experiment: str


def load_settings(workdir: str | Path, config_path: str | Path | None = None) -> TrackingSettings:
    """Settings from `config_path`, else `$GPTCORE_MLFLOW_CONFIG`, else `./mlflow.yaml`, else defaults.

    `{workdir}` in a value is replaced by the absolute work directory; `MLFLOW_TRACKING_URI` and
    `MLFLOW_REGISTRY_URI`, when set, win over the file.
    """
    import yaml

    values = dict(DEFAULT_SETTINGS)
    path = config_path or os.environ.get("GPTCORE_MLFLOW_CONFIG")
    if path is None and Path("mlflow.yaml").is_file():
        path = "mlflow.yaml"
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: MLflow settings file not found")
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(loaded) - set(DEFAULT_SETTINGS))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
        values.update(loaded)
    workdir = Path(workdir).resolve().as_posix()
    values = {k: v.replace("{workdir}", workdir) if isinstance(v, str) else v for k, v in values.items()}
    values["tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI") or values["tracking_uri"]
    values["registry_uri"] = os.environ.get("MLFLOW_REGISTRY_URI") or values["registry_uri"]
    return TrackingSettings(**values)


@dataclass(frozen=True)
class Tracking:
    """Where a stage logs: the settings, and the pipeline run its stage run nests under."""

    settings: TrackingSettings
    parent_run_id: str | None = None

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.registry_uri)

    def experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.settings.experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.settings.artifact_location
        if location and "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        return client.create_experiment(self.settings.experiment, artifact_location=location)


class StageRun:
    """The logging surface of one stage; with `run_id` None every call is a no-op."""

    def __init__(self, client: Any, run_id: str | None):
        self.client = client
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = _flatten(params, prefix)
        # MLflow caps a param value at 6000 characters.
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_dataset(self, manifest: str | Path, digest: str, name: str = "corpus", context: str = "training") -> None:
        """The data behind this run as an MLflow dataset input (its digest; the manifest as source and artifact)."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        # MLflow keeps 36 characters of a dataset digest; the full sha256 goes in the tag.
        dataset = Dataset(name=name, digest=digest[:32], source_type="local",
                          source=json.dumps({"uri": str(Path(manifest).resolve())}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])
        self.log_artifact(manifest)

    def artifact_uri(self, artifact_path: str) -> str | None:
        if not self.enabled:
            return None
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"


@contextlib.contextmanager
def stage_run(tracking: Tracking | None, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """One MLflow run for a stage, nested under the pipeline run when there is one.

    The run ends FINISHED, or FAILED when the stage raises.
    """
    if tracking is None:
        yield StageRun(None, None)
        return
    client = tracking.client()
    run_tags = {"gptcore.stage": name, "mlflow.runName": name, **source_tags(), **(tags or {})}
    if tracking.parent_run_id:
        run_tags["mlflow.parentRunId"] = tracking.parent_run_id
    run = client.create_run(tracking.experiment_id(), run_name=name, tags={k: str(v) for k, v in run_tags.items()})
    log.info("%s: MLflow run %s (%s)", name, run.info.run_id, tracking.settings.tracking_uri)
    status = "FAILED"
    try:
        yield StageRun(client, run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)


def source_tags() -> dict[str, str]:
    """The git commit of the code that runs, when it runs from a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"mlflow.source.git.commit": commit} if commit else {}


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

