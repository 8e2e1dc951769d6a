"""Replicas of `gptcore serve` behind nginx (gptcore.balancer): requests spread over them, and a
replica killed under load fails no request but the ones it held (nginx from the distribution's
packages: .ci/run installs it)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

import httpx
import pytest

from gptcore.balancer import Balancer, BalancerConfig
from gptcore.processes import group_alive

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"), reason="no nginx (apt-get install nginx)"
)
CLIENTS = 6


@pytest.fixture
def balancer(lm_package, tmp_path):
    started = Balancer(BalancerConfig.new(tmp_path / "balancer", [str(lm_package.package_dir)], replicas=3))
    started.up()
    pids = [started.pid(name) for name in ["nginx", *started.replica_names]]
    try:
        yield started
    finally:
        started.down()
        assert not [pid for pid in pids if group_alive(pid)]


def test_requests_spread_and_a_replica_killed_under_load_fails_only_what_it_held(balancer):
    c = balancer.config
    results: list[tuple[float, float, int | str]] = []  # (sent, answered, status or error)
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=c.url, headers={"Authorization": f"Bearer {c.token}"}, timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    body = {"prompt": "wave salt ship", "max_new_tokens": 24, "temperature": 0.8, "seed": i}
                    status: int | str = http.post("/v1/generate", json=body).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                results.append((sent, time.monotonic(), status))

    def answered_after(t: float) -> int:
        return sum(1 for sent, _, _ in results if sent > t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        while len(results) < 60:
            time.sleep(0.05)
        victim = c.replica_ports[1]
        killed = time.monotonic()
        os.killpg(balancer.pid("serve-2"), signal.SIGKILL)
        deadline = killed + 60
        while answered_after(killed) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results if r[2] != 200]
    # at most the requests under way when it died, one per client; none sent after
    assert len(failed) <= CLIENTS and all(sent < killed for sent, _, _ in failed), failed
    assert answered_after(killed) >= 60
    # every replica answered some; the killed one nothing after it died (the log is in order)
    log = (balancer.logs / "nginx-access.log").read_text().splitlines()
    served = [re.findall(r"127\.0\.0\.1:(\d+)", line.split(" 200 ", 1)[1]) for line in log if " 200 " in line]
    assert {int(ports[-1]) for ports in served} == set(c.replica_ports)
    assert victim not in {int(ports[-1]) for ports in served[-50:]}
    print(f"{len(results)} requests, {len(failed)} failed; killed replica :{victim}")
