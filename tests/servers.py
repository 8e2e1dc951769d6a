"""Real Prefect and MLflow servers on free loopback ports, with access control on, for the
access-control and deployment tests.

Each server is a process group of its own with all its state (databases, artifacts, Prefect
home) in a temporary directory; every wait is bounded, and the group is killed on the way out.
Subprocesses get an environment with no PREFECT_* or MLFLOW_* variable of the caller's: only
what a test names reaches them (a PREFECT_API_KEY would otherwise stand in for the auth string).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gptcore.processes import free_port, wait_ready

BIN = Path(sys.executable).parent  # the prefect and mlflow commands of this environment
PREFECT_AUTH_STRING = "gptcore:prefect-test-auth-string"
MLFLOW_ADMIN, MLFLOW_PASSWORD = "admin", "mlflow-test-password"  # MLflow wants >= 12 characters


def clean_env(**extra: str | Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"PYTHONUNBUFFERED": "1"} | {k: str(v) for k, v in extra.items()}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group; after 10 s, or once the leader is gone, SIGKILL to what is left
    of it (a stuck leader, or children that outlived it: uvicorn workers, flow-run processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """`cmd` in a process group of its own, its output to `log`; stopped on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 180) -> str:
    """A command to completion (bounded); its output, or an assertion error showing it."""
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    auth_string: str

    def client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string}

    @contextlib.contextmanager
    def settings(self, auth_string: str | None) -> Iterator[None]:
        """In-process Prefect clients talk to this server, sending `auth_string` (None: nothing)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

        with temporary_settings(
            {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: auth_string}, restore_defaults={PREFECT_API_KEY}
        ):
            yield


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    username: str
    password: str

    def client_env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }


@dataclass(frozen=True)
class ServerSpec:
    cmd: list[str]
    env: dict[str, str]
    log: Path
    ready_url: str


def prefect_server_spec(root: Path, auth_string: str) -> tuple[ServerSpec, PrefectServer]:
    """`prefect server start` requiring `auth_string`, on SQLite under `root`. No scheduler: the
    deployments' schedules are stored, but no scheduled run starts behind a test's back."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_env(
        PREFECT_HOME=root / "home",
        PREFECT_SERVER_API_AUTH_STRING=auth_string,
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return (
        ServerSpec(cmd, env, root / "server.log", f"http://127.0.0.1:{port}/api/health"),
        PrefectServer(f"http://127.0.0.1:{port}/api", auth_string),
    )


def mlflow_server_command(root: Path, port: int, *extra: str) -> list[str]:
    """`mlflow server` on loopback `port`: runs in SQLite and artifacts in a directory, both under `root`."""
    return [
        str(BIN / "mlflow"),
        "server",
        *extra,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]


def mlflow_server_spec(root: Path, password: str) -> tuple[ServerSpec, MlflowServer]:
    """`mlflow server --app-name basic-auth` (admin `MLFLOW_ADMIN` with `password`): runs, registry and
    users in SQLite under `root`, artifacts proxied by the server to a directory there."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "basic_auth.ini"
    # auth_cache_ttl_seconds: each request otherwise pays a PBKDF2 check (about a second here)
    config.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n"
        f"admin_username = {MLFLOW_ADMIN}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n"
    )
    env = clean_env(MLFLOW_AUTH_CONFIG_PATH=config, MLFLOW_FLASK_SERVER_SECRET_KEY="gptcore-test-secret-key")
    cmd = mlflow_server_command(root, port, "--app-name", "basic-auth")
    return (
        ServerSpec(cmd, env, root / "server.log", f"http://127.0.0.1:{port}/health"),
        MlflowServer(f"http://127.0.0.1:{port}", MLFLOW_ADMIN, password),
    )


@dataclass(frozen=True)
class SecuredServers:
    prefect: PrefectServer
    mlflow: MlflowServer


@contextlib.contextmanager
def secured_servers(root: Path) -> Iterator[SecuredServers]:
    """Both servers with access control on, started side by side (each takes 10-40 s to answer)."""
    specs = [
        prefect_server_spec(root / "prefect", PREFECT_AUTH_STRING),
        mlflow_server_spec(root / "mlflow", MLFLOW_PASSWORD),
    ]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(background(spec.cmd, spec.env, spec.log)) for spec, _ in specs]
        for proc, (spec, _) in zip(procs, specs):
            wait_ready(proc, spec.ready_url, spec.log)
        yield SecuredServers(specs[0][1], specs[1][1])


# Shared by tests/integration/test_server_auth.py and test_deployments.py through tests/conftest.py: the
# servers start once per session.
@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[SecuredServers]:
    with secured_servers(tmp_path_factory.mktemp("servers")) as started:
        yield started
