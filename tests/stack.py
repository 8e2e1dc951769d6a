"""The process stack of gptcore.stack (PostgreSQL, the S3 server, MLflow and Prefect servers, two
process workers) for the deployment tests, started once per session with `scripts/stack.sh up`
and stopped with `down`, which must leave no process of it behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptcore.processes import group_alive, reap
from gptcore.stack import Stack, StackConfig

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def client_env(stack: Stack) -> Iterator[dict[str, str]]:
    """This process a client of the stack (its environment and in-process Prefect clients)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    env = stack.config.client_env()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}
        with temporary_settings(settings, restore_defaults={PREFECT_API_KEY}):
            yield env


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    script = [str(REPO / "scripts" / "stack.sh")]
    up = subprocess.run(["bash", *script, "up", str(root), "--no-schedules"], capture_output=True, text=True)
    started = Stack(StackConfig.load(root)) if (root / "stack.json").is_file() else None
    try:
        assert up.returncode == 0, f"stack.sh up: {up.stdout}\n{up.stderr}"
        yield started
    finally:
        pids = [int(p.read_text()) for p in (root / "pids").glob("*.pid")]
        pg_data = Path(started.config.pg_data) if started else None
        subprocess.run(["bash", *script, "down", str(root)], capture_output=True, text=True, timeout=300)
        for pid in pids:
            reap(pid)  # a service a test restarted is this process's child: a zombie until collected here
        left = [pid for pid in pids if group_alive(pid)]
        assert not left, f"stack.sh down left process groups {left} running"
        assert not list((root / "pids").glob("*.pid")) and not (
            pg_data and (pg_data / "db" / "postmaster.pid").exists()
        )
        assert not (pg_data and pg_data.exists() and os.geteuid() == 0), f"{pg_data} left behind"
