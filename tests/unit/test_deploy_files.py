"""The production stack's files, checked for structure (no Docker engine runs here): services,
images, ports, volumes, and every secret a required variable from the environment, never a value."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REQUIRED_VAR = re.compile(r"\$\{[A-Z0-9_]+:\?[^}]+\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING")


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_has_the_stack_and_its_wiring():
    services = compose()["services"]
    assert {
        "prefect-db",
        "mlflow-db",
        "minio",
        "minio-init",
        "mlflow",
        "prefect-server",
        "prefect-worker",
        "prefect-worker-gpu",
    } <= set(services)
    assert services["prefect-db"]["image"].startswith("postgres:") and services["mlflow-db"]["image"].startswith(
        "postgres:"
    )
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:3")
    # published on loopback unless BIND says otherwise
    assert services["prefect-server"]["ports"] == ["${BIND:-127.0.0.1}:4200:4200"]
    assert services["mlflow"]["ports"] == ["${BIND:-127.0.0.1}:5000:5000"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://prefect:"
    )
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    for flag in ("--app-name basic-auth", "--artifacts-destination s3://mlflow"):
        assert flag in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    worker = services["prefect-worker"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "gptcore-process" in worker["command"]
    gpu = services["prefect-worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    named = set(compose()["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in named, f"{name}: volume {volume} is not declared"


def test_every_secret_comes_from_the_environment():
    found = 0
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                found += 1
                assert REQUIRED_VAR.fullmatch(str(value)), f"{name}.{key} must be ${{VAR:?...}}, not {value!r}"
            elif "${" in str(value):
                assert REQUIRED_VAR.search(str(value)), f"{name}.{key}: a variable with no :? can default to empty"
    assert found >= 9
    example = (DEPLOY / "stack.env.example").read_text().splitlines()
    assert all(line.split("=", 1)[1] in ("", "admin") for line in example if "=" in line and not line.startswith("#"))


def test_the_env_file_with_real_secrets_is_ignored_by_git():
    root = DEPLOY.parent
    if not (root / ".git").exists():
        return  # an sdist: no repository to ask
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/stack.env"], cwd=root)
    assert ignored.returncode == 0


def test_dockerfile_is_cuda_runtime_non_root_and_installs_the_package():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.\-]+-runtime-", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"pip install \. ", text) and "COPY gptcore gptcore" in text and "COPY flows flows" in text
    assert not SECRET_NAME.search(re.sub(r"#.*", "", text))  # no secret baked into the image


def test_every_deployment_runs_one_flow_run_at_a_time():
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    deployments = {d["name"]: d for d in yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["deployments"]}
    strategies = {}
    for name, deployment in deployments.items():
        limit = ConcurrencyLimitConfig(**deployment["concurrency_limit"])  # as `prefect deploy` reads it
        assert limit.limit == 1, name
        strategies[name] = limit.collision_strategy
    # a late weekly pipeline is not stacked behind; an hour's scoring and a promotion wait their turn
    assert strategies == {
        "pipeline-weekly": ConcurrencyLimitStrategy.CANCEL_NEW,
        "scoring-hourly": ConcurrencyLimitStrategy.ENQUEUE,
        "promote-version": ConcurrencyLimitStrategy.ENQUEUE,
    }


def test_a_flow_run_whose_heartbeats_stop_is_crashed_by_the_automation(tmp_path):
    from prefect.events.schemas.automations import AutomationCore, Posture

    from gptcore.stack import CRASH_AUTOMATION, HEARTBEAT_S, Stack, StackConfig

    (automation, *_) = [
        AutomationCore.model_validate(a)
        for a in yaml.safe_load((DEPLOY / "automations.yaml").read_text())["automations"]
    ]
    assert automation.name == CRASH_AUTOMATION
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    # a missed heartbeat or two (a busy machine) is not a crash
    assert trigger.within.total_seconds() >= 3 * HEARTBEAT_S
    assert [a.type for a in automation.actions] == ["change-flow-run-state"]
    assert automation.actions[0].state.value == "CRASHED"
    # the workers that run flows send the heartbeats: compose's and the process stack's alike
    for name in ("prefect-worker", "prefect-worker-gpu"):
        assert compose()["services"][name]["environment"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)
    stack = Stack(StackConfig.new(root=tmp_path))
    shutil.rmtree(stack.config.pg_data, ignore_errors=True)  # made for PostgreSQL as root; unused here
    assert stack.worker_env("worker-1")["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)
    assert CRASH_AUTOMATION in " ".join(compose()["services"]["prefect-automations"]["command"].split())
