"""Secrets: credentials inside tracking or database URIs, and secret environment variables, never
reach logs, MLflow params or tags, the pipeline summary (a Prefect and an MLflow artifact) or
files in the work directory; the compose stack keeps secrets off command lines, publishes its
ports on loopback unless told otherwise, and runs its workers as a non-admin MLflow user."""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow import MlflowClient

from gptcore.config import IngestConfig
from gptcore.data.ingest import ingest
from gptcore.errors import GptcoreError, redact
from gptcore.tracking import Tracking, TrackingSettings, TrackingUnavailable, stage_run

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKEN = "tok3n-s3cret-9f1c"
PASSWORD = "pa55-s3cret-77d2"
AWS_KEY = "wJalrXUtnFEMI-K7MDENG-s3cret"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)


def assert_no_secret(text: str, where: str) -> None:
    for secret in (TOKEN, PASSWORD, AWS_KEY):
        assert secret not in text, f"{where} holds a secret: ...{text[max(text.find(secret) - 60, 0) :][:120]}..."


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"http://worker:{PASSWORD}@mlflow:5000", "http://worker:***@mlflow:5000"),
        (
            f"postgresql+asyncpg://prefect:{PASSWORD}@db:5432/prefect",
            "postgresql+asyncpg://prefect:***@db:5432/prefect",
        ),
        (f"https://{TOKEN}@git.example/repo", "https://***@git.example/repo"),
        (f"http://mlflow:5000/?token={TOKEN}&x=1", "http://mlflow:5000/?token=***&x=1"),
        (
            f"https://b.s3.example/k?X-Amz-Credential={TOKEN}/us&X-Amz-Signature={TOKEN}&X-Amz-Date=1",
            "https://b.s3.example/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1",
        ),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_redact_hides_credentials_and_keeps_the_rest(uri, shown):
    assert redact(uri) == shown
    quoted = "see (browse: mlflow ui --backend-store-uri {}) now"
    assert redact(quoted.format(uri)) == quoted.format(shown)


def test_redact_hides_secret_environment_values_wherever_they_appear(secret_env, monkeypatch):
    monkeypatch.setenv("GPTCORE_PLAIN", "an-ordinary-value")
    text = redact(f"boto3 said: bad key {AWS_KEY}; password {PASSWORD}; an-ordinary-value")
    assert text == "boto3 said: bad key ***; password ***; an-ordinary-value"


def test_a_stage_with_a_credentialed_tracking_uri_leaks_it_nowhere(tmp_path, secret_env, caplog):
    # A SQLite store takes (and ignores) a query parameter, so the recorded URI can carry a real token.
    settings = TrackingSettings(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db?token={TOKEN}",
        registry_uri=None,
        artifact_location=str(tmp_path / "artifacts"),
        experiment="secrets",
    )
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} about the sea."}) + "\n" for i in range(30)))
    caplog.set_level(logging.INFO, logger="gptcore")
    ingest(IngestConfig(sources=[str(corpus)]), tmp_path / "work" / "data", Tracking(settings))

    assert "token=***" in caplog.text  # the stage said where it logs, redacted
    assert_no_secret(caplog.text, "the log")
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert runs and runs[0].data.params  # the stage did record its config
    for run in runs:
        assert_no_secret(json.dumps(run.data.params) + json.dumps(run.data.tags), f"run {run.info.run_id}")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5  # the splits, the manifest, the MLflow store and its artifacts
    for path in files:
        assert_no_secret(path.read_bytes().decode("latin-1"), str(path))


def test_an_mlflow_error_quoting_the_credentialed_uri_is_raised_redacted(tmp_path, secret_env, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://worker:{PASSWORD}@127.0.0.1:{port}/?token={TOKEN}"
    settings = TrackingSettings(tracking_uri=uri, registry_uri=None, artifact_location=None, experiment="x")
    with pytest.raises(GptcoreError) as raised, stage_run(Tracking(settings), "ingest"):
        pass
    message = str(raised.value)
    assert isinstance(raised.value, TrackingUnavailable)  # still transient: the flow's retries apply
    assert f"worker:***@127.0.0.1:{port}" in message and "token=***" in message
    assert_no_secret(message, "the error")
    assert_no_secret(caplog.text, "the log")


def test_pipeline_summary_shows_the_tracking_uri_redacted(tmp_path, secret_env):
    from flows.summary import pipeline_summary

    settings = TrackingSettings(f"http://worker:{PASSWORD}@mlflow:5000/?token={TOKEN}", None, None, "gptcore")
    parity = {"max_abs_logit_diff": 1e-6, "greedy_tokens_equal": 8, "greedy_tokens": 8}
    summary = pipeline_summary(
        workdir=tmp_path,
        settings=settings,
        experiment_id="1",
        seconds=1.0,
        skipped={"classifier": "no labels", "chat": "no dialogue", "score": "no classifier"},
        data=SimpleNamespace(documents={"train": 8, "val": 1, "test": 1}, digest="0" * 64),
        tokens=SimpleNamespace(tokens={"train": 80, "val": 10, "test": 10}, vocab_size=300),
        pretrained=SimpleNamespace(num_params=1e5, steps=10, train_seconds=1.0),
        finetuned=None,
        chat=None,
        lm_eval=SimpleNamespace(test={"bpb": 2.0, "perplexity": 9.0}, unigram_bpb={"test": 4.0}),
        cls_eval=None,
        chat_eval=None,
        lm_pkg=SimpleNamespace(parity=parity, package_dir=str(tmp_path / "export" / "lm")),
        cls_pkg=None,
        chat_pkg=None,
        lm_reg=SimpleNamespace(
            name="gptcore-lm", version="1", champion_version="1", promoted=True, reason="first", champion_uri="m"
        ),
        cls_reg=None,
        chat_reg=None,
        scores=None,
    )
    assert summary["tracking_uri"] == "http://worker:***@mlflow:5000/?token=***"
    assert "http://worker:***@mlflow:5000/?token=***" in summary["markdown"]
    assert_no_secret(json.dumps(summary), "the summary")


# --- the compose stack -----------------------------------------------------------------------

CREDENTIAL_IN_URI = re.compile(r"://[^/\s\"']*:[^/\s\"']*@")  # scheme://user:password@
SECRET_FLAG = re.compile(r"--[\w-]*(password|secret|token|key)\b", re.I)
SECRET_VAR = re.compile(r"\$\$?\{?\w*(PASSWORD|SECRET|TOKEN|AUTH_STRING)", re.I)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def command_line(service: dict) -> str:
    parts = [service.get(key) or "" for key in ("command", "entrypoint")]
    return " ".join(" ".join(p) if isinstance(p, list) else str(p) for p in parts)


def test_compose_keeps_secrets_off_command_lines():
    for name, service in compose()["services"].items():
        line = command_line(service)
        assert not CREDENTIAL_IN_URI.search(line), f"{name}: a URI with a password on the command line: {line}"
        assert not SECRET_FLAG.search(line), f"{name}: a secret passed as a flag: {line}"
        # A secret variable expanded into argv shows in `ps` and /proc: only the mlflow service's
        # one printf (a shell builtin, no process) may name one, to write the auth ini.
        named = SECRET_VAR.findall(line)
        assert not named or name == "mlflow", f"{name}: names a secret variable in its command: {line}"
    mlflow = compose()["services"]["mlflow"]
    assert "--backend-store-uri" not in command_line(mlflow)
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:${MLFLOW_DB_PASSWORD:?")


def test_compose_publishes_ports_on_loopback_unless_told_otherwise():
    published = [(name, port) for name, s in compose()["services"].items() for port in s.get("ports", [])]
    assert {p.rsplit(":", 1)[1] for _, p in published} == {"4200", "5000", "9001"}
    for name, port in published:
        assert str(port).startswith("${BIND:-127.0.0.1}:"), f"{name}: {port} is published on every interface"


def test_compose_workers_use_a_non_admin_mlflow_user_created_once():
    services = compose()["services"]
    for name in ("prefect-worker", "prefect-worker-gpu"):
        env = services[name]["environment"]
        admin = services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"]
        assert env["MLFLOW_TRACKING_USERNAME"] not in ("admin", admin)
        assert env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_WORKER_PASSWORD:?set MLFLOW_WORKER_PASSWORD}"
        assert services[name]["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}
        assert not {"AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"} & set(env)  # uploads go through the server
    users = services["mlflow-users"]
    assert users["restart"] == "no"
    assert users["environment"]["MLFLOW_TRACKING_USERNAME"] == "admin"
    script = command_line(users)
    worker = services["prefect-worker"]["environment"]["MLFLOW_TRACKING_USERNAME"]
    assert f'"{worker}"' in script and "create_user" in script and "update_user_password" in script
    assert "is_admin" not in script and "update_user_admin" not in script
    example = (DEPLOY / "stack.env.example").read_text()
    assert "MLFLOW_WORKER_PASSWORD=" in example and "MLFLOW_TRACKING_USERNAME" not in example
