"""MLflow tracking in one place: settings, one run per stage, and the logging helpers stages use.

Runs are driven through `MlflowClient` with explicit run ids rather than MLflow's fluent
"active run", which is per thread: Prefect may run a task on another thread than its flow.
A stage given no `Tracking` logs nothing, so every stage is testable with tracking off.

Metrics survive a tracking server outage: while MLflow is unreachable they wait in memory and
go out with the next call that gets through, or at the end of the stage, which raises only then,
after the stage has written its outputs (a training stage's checkpoints among them).

A tracking or database URI may carry credentials (`http://user:password@host`, `?token=...`):
`redact` is the one way such a URI, or a message quoting one, is shown or recorded.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.errors import ConfigError, GptcoreError, redact
from gptcore.sysmetrics import SystemMetrics

log = logging.getLogger("gptcore.tracking")

DEFAULT_SETTINGS = {
    "tracking_uri": "sqlite:///{workdir}/mlflow.db",
    "registry_uri": None,
    "artifact_location": "{workdir}/mlartifacts",
    "experiment": "gptcore",
}
# Untyped, MLflow's UI guesses the experiment's kind and may open it on an empty GenAI overview of
# traces: ours trains models, so it opens on the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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
    """Where a stage logs: the settings, the pipeline run its stage run nests under, and tags every
    stage run gets (a flow says which flow run it is: MLflow's Source column shows it)."""

    settings: TrackingSettings
    parent_run_id: str | None = None
    run_tags: tuple[tuple[str, str], ...] = ()

    def client(self):
        from mlflow import MlflowClient

        for uri in {self.settings.tracking_uri, self.settings.registry_uri} - {None}:
            path = uri.removeprefix("sqlite:///").partition("?")[0]  # the file, less SQLAlchemy's query
            if uri.startswith("sqlite:///") and path not in ("", ":memory:") and not Path(path).exists():
                create_sqlite_store(Path(path))
        return MlflowClient(tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.registry_uri)

    def experiment_id(self) -> str:
        """The experiment's id, made on first use; typed for model training (`EXPERIMENT_KIND`)."""
        client = self.client()
        exp = client.get_experiment_by_name(self.settings.experiment)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older gptcore, or by hand
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = self.settings.artifact_location
        if location and "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        return client.create_experiment(
            self.settings.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )


def create_sqlite_store(path: Path) -> None:
    """A new SQLite store, published whole. MLflow creates its tables one migration at a time: a
    process killed in between leaves a file no later run can open ("table ... already exists"), so
    the schema is built in a file beside `path` and linked into place, unless another process put
    its own there first (then theirs stays)."""
    from mlflow import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.with_name(f".{path.name}.{os.getpid()}.new")
    building.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments(max_results=1)
        with contextlib.suppress(FileExistsError):
            os.link(building, path)
    finally:
        building.unlink(missing_ok=True)


class TrackingUnavailable(GptcoreError):
    """MLflow stayed unreachable until the end of a stage: some of its metrics are not logged."""


def is_transient(error: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a network or server hiccup worth retrying.

    Connection failures and timeouts, HTTP 5xx and 429 answers, and MlflowExceptions whose
    status is 5xx (MLflow reports an unreachable server as one); not 4xx, bad input or bugs.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError, TrackingUnavailable)) or _is_network_error(error):
            return True
        status = _http_status(error)
        if status is not None and (status >= 500 or status == 429):
            return True
        error = error.__cause__ or error.__context__
    return False


def _is_network_error(error: BaseException) -> bool:
    # Only libraries already imported can have raised their errors.
    requests, httpx = sys.modules.get("requests"), sys.modules.get("httpx")
    return bool(
        (requests and isinstance(error, (requests.ConnectionError, requests.Timeout)))
        or (httpx and isinstance(error, httpx.TransportError))
    )


def _http_status(error: BaseException) -> int | None:
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions and isinstance(error, mlflow_exceptions.MlflowException):
        return error.get_http_status_code()
    status = getattr(getattr(error, "response", None), "status_code", None)  # requests, httpx, huggingface_hub
    return status if isinstance(status, int) else None


class StageRun:
    """The logging surface of one stage; with `run_id` None every call is a no-op."""

    # After a failed send, metrics are only kept until this many seconds have passed (doubling
    # with each failure, up to the cap): while the server is down, a training step does not wait
    # on MLflow's own retries every time it logs.
    RETRY_AFTER_S = 30.0
    MAX_RETRY_AFTER_S = 600.0
    MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on one log_batch

    def __init__(self, client: Any, run_id: str | None, label: str = "MLflow"):
        self.client = client
        self.run_id = run_id
        self.label = label  # for messages: the stage and the tracking URI
        self.pending: list[Any] = []  # Metric entities not yet accepted by MLflow, oldest first
        self.failures = 0
        self.next_attempt = 0.0  # time.monotonic() before which a send is not tried again
        self.last_error: BaseException | None = None

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
        """Log now; while MLflow is unreachable, keep them (with their time and step) for the next send."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if time.monotonic() >= self.next_attempt:
            self.send_pending()

    def send_pending(self) -> bool:
        """Send the kept metrics, oldest first; False if MLflow is unreachable (errors of other kinds raise)."""
        sent = 0
        try:
            while self.pending:
                batch = self.pending[: self.MAX_METRICS_PER_BATCH]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending[: len(batch)]
                sent += len(batch)
        except Exception as e:
            if not is_transient(e):
                raise
            self.failures += 1
            self.last_error = e
            wait = min(self.RETRY_AFTER_S * 2 ** (self.failures - 1), self.MAX_RETRY_AFTER_S)
            self.next_attempt = time.monotonic() + wait
            log.warning(
                "%s unreachable (%s: %s): keeping %d metric values of run %s to send later (next try in %.0fs)",
                self.label,
                type(e).__name__,
                redact(str(e)),
                len(self.pending),
                self.run_id,
                wait,
            )
            return False
        if self.failures:
            log.info("%s reachable again: sent the %d metric values kept for run %s", self.label, sent, self.run_id)
            self.failures, self.next_attempt, self.last_error = 0, 0.0, None
        return True

    def flush(self) -> None:
        """Send every kept metric now; TrackingUnavailable if MLflow is still unreachable."""
        if self.enabled and self.pending and not self.send_pending():
            raise TrackingUnavailable(
                f"{self.label} still unreachable at the end of the stage: {len(self.pending)} metric values of run "
                f"{self.run_id} are not logged (last error: {type(self.last_error).__name__}: "
                f"{redact(str(self.last_error))}). "
                "The stage's outputs are written (a training stage's metrics.jsonl keeps every logged step)"
            )

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

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_dataset(self, manifest: str | Path, digest: str, name: str = "corpus", context: str = "training") -> None:
        """The data behind this run as an MLflow dataset input (its digest; the manifest as source and artifact)."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        # MLflow keeps 36 characters of a dataset digest; the full sha256 goes in the tag.
        dataset = Dataset(
            name=name,
            digest=digest[:32],
            source_type="local",
            source=json.dumps({"uri": str(Path(manifest).resolve())}),
        )
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        )
        self.log_artifact(manifest)

    def artifact_uri(self, artifact_path: str) -> str | None:
        if not self.enabled:
            return None
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"


@contextlib.contextmanager
def stage_run(
    tracking: Tracking | None, name: str, tags: Mapping[str, Any] | None = None, system_metrics: bool = False
) -> Iterator[StageRun]:
    """One MLflow run for a stage, nested under the pipeline run when there is one.

    The run ends FINISHED, or FAILED when the stage raises. With `system_metrics`, the machine's
    load is sampled into the run while the stage runs (the training stages ask for it).
    """
    if tracking is None:
        yield StageRun(None, None)
        return
    client = tracking.client()
    run_tags = {
        "gptcore.stage": name,
        "mlflow.runName": name,
        **source_tags(),
        **dict(tracking.run_tags),
        **(tags or {}),
    }
    if tracking.parent_run_id:
        run_tags["mlflow.parentRunId"] = tracking.parent_run_id
    shown_uri = redact(tracking.settings.tracking_uri)
    try:
        run = client.create_run(tracking.experiment_id(), run_name=name, tags={k: str(v) for k, v in run_tags.items()})
    except Exception as e:
        if (safe := _redacted_error(e, f"{name}: MLflow at {shown_uri}")) is not None:
            raise safe from None
        raise
    run_id = run.info.run_id
    log.info("%s: MLflow run %s (%s)", name, run_id, shown_uri)
    sampler = SystemMetrics(run_id, tracking.settings.tracking_uri) if system_metrics else None
    try:
        stage = StageRun(client, run_id, label=f"{name}: MLflow at {shown_uri}")
        yield stage
        if sampler is not None:
            sampler.stop()
        stage.flush()  # the stage's outputs are written by now: only the metrics can be missing
    except BaseException as error:
        if sampler is not None:
            sampler.stop()
        try:
            client.set_terminated(run_id, status="FAILED")
        except Exception as e:  # MLflow may be the reason the stage failed: keep that error, not this one
            log.warning(
                "%s: could not mark MLflow run %s FAILED (%s: %s)", name, run_id, type(e).__name__, redact(str(e))
            )
        if isinstance(error, Exception) and (safe := _redacted_error(error, stage.label)) is not None:
            raise safe from None
        raise
    client.set_terminated(run_id, status="FINISHED")


def _redacted_error(error: Exception, context: str) -> GptcoreError | None:
    """The error again with its credentials redacted, when its message quotes some (MLflow's own
    errors quote the request URL, userinfo and query included); None when there is nothing to hide.
    Transient stays transient (TrackingUnavailable), so retries still apply."""
    text = str(error)
    if redact(text) == text:
        return None
    kind = TrackingUnavailable if is_transient(error) else GptcoreError
    return kind(f"{context}: {type(error).__name__}: {redact(text)}")


@functools.cache
def source_tags() -> dict[str, str]:
    """Who ran what: the user, the command (MLflow's Source column), and the git commit of the code
    that runs, when it runs from a git checkout. The same for every run of a process."""
    tags = {
        "mlflow.user": _user(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": _command(),
    }
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        commit = found.stdout.strip() if found.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return tags | ({"mlflow.source.git.commit": commit} if commit else {})


def _command() -> str:
    """The program and its first argument (`gptcore pipeline`, `pytest tests/...`); `python` when interactive."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([program, *sys.argv[1:2]])


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no $USER
        return f"uid {os.getuid()}"


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
