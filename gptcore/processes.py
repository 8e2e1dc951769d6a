"""Services as process groups on one machine, each known by a pid file: started and waited for,
stopped by group (what a service spawned goes with it), on free loopback ports. The process stack
(gptcore.stack) and the serving replicas behind a balancer (gptcore.balancer) are made of them.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

START_TIMEOUT_S, STOP_TIMEOUT_S = 120, 10


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port from that range, free
    when chosen, can be taken by any outgoing connection before its server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Until a GET of `url` answers 200; bounded by START_TIMEOUT_S, failing early, with the log,
    if the process exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{' '.join(proc.args)}: {url} not ready after {START_TIMEOUT_S} s:\n{tail(log)}")
        time.sleep(0.3)


def start_group(
    argv: list[str], env: dict[str, str], cwd: Path, log: Path, pid_file: Path, ready_url: str | None = None
) -> None:
    """`argv` as the leader of a new process group, its output appended to `log`, its pid in
    `pid_file`; waited for until `ready_url` answers, where there is one."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    if ready_url:
        wait_ready(proc, ready_url, log)


def stop_group(pid_file: Path) -> None:
    """SIGTERM to the process group of `pid_file`, SIGKILL to what is left of it after
    STOP_TIMEOUT_S; the pid file removed. Nothing to do without one."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while group_alive(pid) and time.monotonic() < deadline:
            reap(pid)
            time.sleep(0.1)
        if not group_alive(pid):
            break
    pid_file.unlink()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (a zombie leader counts until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap(pid: int) -> None:
    """Collect `pid` if it is our child (started in this process): else it stays a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def write_private(path: Path, text: str) -> None:
    """`text` into `path`, readable by its owner alone from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
