"""A loopback soak of `gptcore serve`: hundreds of idle, slow and stalled connections held open beside
normal load for minutes, to show that they cost valid clients nothing.

    python bench/serve_soak.py [--model PACKAGE_OR_URI | --workdir DIR] [--duration 150] [--bad 300]
                               [--stalled 8] [--clients 4] [--json out.json]

The server runs as a subprocess with its default limits (a fresh bearer token, a free loopback
port; the log's path is printed). For `--duration` seconds this process keeps `--bad` bad
connections open, a third of each kind, each reopened as soon as the server closes it:
- slowloris: half a request header, then one more header byte every 2 s, never finished;
- silent: connected, nothing sent;
- idle keep-alive: one /healthz answered, then nothing;
and `--stalled` streamed completions (n=8, --max-tokens each) whose readers read nothing, each
replaced every STALL_HOLD_S seconds. On loopback the kernel's autotuned send buffer takes a whole
stream of the server's default size (~0.5 MB): the server finishes it, hands it to the kernel and
closes its side, and the client, reading nothing, never sees the close; what the server holds is
shown by its file descriptors. (tests/faults/test_server_edge.py shrinks the server's send buffer
to show the write deadline dropping a stream mid-way.) Beside them, `--clients` clients send valid authenticated
generations back to back (/v1/generate, half of them streamed), and a probe asks /healthz every
0.1 s on a new connection.

Figures: valid requests and how many failed (any status but 200, a transport error, a broken
stream), their latency p50/p99, /healthz p50/p99/max, how often the server closed each kind of bad
connection, and the server's resident memory after warm-up, at the end and at its highest. It exits
non-zero if a valid request failed or /healthz p99 reached a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures
from serve_load import free_port, percentile_ms, rss_mb  # bench/serve_load.py

KINDS = ("slowloris", "silent", "idle")
STALL_HOLD_S = 30
TCP_ESTABLISHED = 1  # Linux's tcpi_state, the first byte of TCP_INFO


class Server:
    """`gptcore serve` in a subprocess on a free loopback port, with a fresh token."""

    def __init__(self, model: str, args):
        self.port, self.token = free_port(), secrets.token_urlsafe(32)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="gptcore-soak-", suffix=".log")[1])
        command = [sys.executable, "-m", "gptcore.cli", "serve", "--model", model, "--port", str(self.port)]
        command += ["--device", args.device]
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "GPTCORE_SERVE_TOKEN": self.token, "PYTHONPATH": root}
        with open(self.log, "w") as log_file:
            self.process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + args.start_timeout
        while True:
            if self.process.poll() is not None:
                sys.exit(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"the server was not ready within {args.start_timeout} s:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def rss_mb(self) -> float:
        return rss_mb(self.process.pid)

    def open_files(self) -> int:
        """File descriptors the server holds: its sockets among them (Linux's /proc)."""
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        print(f"  (server log: {self.log})", flush=True)


def server_closed(sock: socket.socket) -> bool:
    """Whether the server ended this connection (FIN or RST), without reading what it sent."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != TCP_ESTABLISHED


class BadClients:
    """The bad connections, each kind kept at its count: the server closing one is counted, and it is reopened."""

    def __init__(self, server: Server, bad: int, stalled: int, max_tokens: int):
        self.server, self.host = server, f"Host: 127.0.0.1:{server.port}\r\n".encode()
        self.counts = {kind: bad // len(KINDS) for kind in KINDS} | {"stalled": stalled}
        self.open: dict[str, list[socket.socket]] = {kind: [] for kind in self.counts}
        self.opened_at: dict[socket.socket, float] = {}
        self.replaced = 0  # stalled streams the client gave up after STALL_HOLD_S
        self.closed_by_server = dict.fromkeys(self.counts, 0)
        self.open_samples: list[int] = []
        self.stream = json.dumps(
            {"model": "lm", "prompt": "ROMEO.", "max_tokens": max_tokens, "n": 8, "stream": True}
        ).encode()
        self.stop = threading.Event()

    def connect(self, kind: str) -> socket.socket:
        sock = socket.socket()
        if kind == "stalled":  # a small window: the server's buffers fill after a few chunks
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.server.port))
        if kind == "slowloris":
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + self.host + b"X-Slow: ")
        elif kind == "idle":
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + self.host + b"\r\n")
            sock.recv(4096)
        elif kind == "stalled":
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\n"
                + self.host
                + f"Authorization: Bearer {self.server.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(self.stream)}\r\n\r\n".encode()
                + self.stream
            )
        return sock

    def run(self) -> None:
        trickle_at = time.monotonic()
        while not self.stop.is_set():
            trickle = time.monotonic() >= trickle_at
            for kind, socks in self.open.items():
                for sock in list(socks):
                    closed = server_closed(sock)
                    if not closed and kind == "stalled" and time.monotonic() - self.opened_at[sock] > STALL_HOLD_S:
                        self.replaced += 1
                        socks.remove(sock)
                        self.opened_at.pop(sock, None)
                        sock.close()
                        continue
                    if not closed and kind == "slowloris" and trickle:
                        try:
                            sock.send(b"x")
                        except OSError:
                            closed = True
                    if closed:
                        self.closed_by_server[kind] += 1
                        socks.remove(sock)
                        self.opened_at.pop(sock, None)
                        sock.close()
                while len(socks) < self.counts[kind]:
                    try:
                        socks.append(self.connect(kind))
                        self.opened_at[socks[-1]] = time.monotonic()
                    except OSError:
                        break  # the server closed it at once (evicted under pressure): the next round retries
            if trickle:
                trickle_at = time.monotonic() + 2
            self.open_samples.append(sum(len(s) for s in self.open.values()))
            self.stop.wait(0.2)
        for socks in self.open.values():
            for sock in socks:
                sock.close()


class Outcomes:
    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: list[float] = []
        self.failures: list[str] = []

    def add(self, seconds: float, failure: str | None) -> None:
        with self.lock:
            self.seconds.append(seconds)
            if failure is not None:
                self.failures.append(failure)


def valid_client(server: Server, index: int, outcomes: Outcomes, stop: threading.Event) -> None:
    """Back-to-back generations, sampled with a seed each, every other one streamed."""
    with httpx.Client(headers=server.auth, timeout=60) as client:
        i = 0
        while not stop.is_set():
            body = {"prompt": "ROMEO.", "max_new_tokens": 16, "temperature": 0.8, "seed": index * 100_000 + i}
            start, failure = time.monotonic(), None
            try:
                if i % 2:
                    answer = client.post(f"{server.url}/v1/generate", json=body)
                    if answer.status_code != 200:
                        failure = f"{answer.status_code}: {answer.text[:200]}"
                else:
                    with client.stream("POST", f"{server.url}/v1/generate", json=body | {"stream": True}) as answer:
                        lines = [line for line in answer.iter_lines() if line]
                    if answer.status_code != 200 or lines[-1:] != ["data: [DONE]"]:
                        failure = f"stream {answer.status_code}: {lines[-2:]}"
            except httpx.HTTPError as e:
                failure = f"{type(e).__name__}: {e}"
            outcomes.add(time.monotonic() - start, failure)
            i += 1


def health_probe(server: Server, outcomes: Outcomes, stop: threading.Event) -> None:
    while not stop.is_set():
        start, failure = time.monotonic(), None
        try:
            answer = httpx.get(f"{server.url}/healthz", timeout=10)  # a new connection each time
            if answer.status_code != 200:
                failure = f"{answer.status_code}: {answer.text[:200]}"
        except httpx.HTTPError as e:
            failure = f"{type(e).__name__}: {e}"
        outcomes.add(time.monotonic() - start, failure)
        stop.wait(0.1)


def soak(model: str, args) -> dict:
    server = Server(model, args)
    try:
        with httpx.Client(headers=server.auth, timeout=60) as client:  # warm-up: the first calls allocate
            for _ in range(4):
                client.post(f"{server.url}/v1/generate", json={"prompt": "ROMEO.", "max_new_tokens": 16})
        rss, files = {"start": server.rss_mb()}, {"start": server.open_files()}
        rss_samples, file_samples = [rss["start"]], [files["start"]]
        bad = BadClients(server, args.bad, args.stalled, args.max_tokens)
        valid, health, stop = Outcomes(), Outcomes(), threading.Event()
        threads = [threading.Thread(target=bad.run, daemon=True)]
        threads += [threading.Thread(target=valid_client, args=(server, i, valid, stop)) for i in range(args.clients)]
        threads += [threading.Thread(target=health_probe, args=(server, health, stop))]
        for thread in threads:
            thread.start()
        start = time.monotonic()
        while time.monotonic() - start < args.duration:
            time.sleep(5)
            rss_samples.append(server.rss_mb())
            file_samples.append(server.open_files())
            print(
                f"  {time.monotonic() - start:5.0f} s: {bad.open_samples[-1] if bad.open_samples else 0} bad open, "
                f"{len(valid.seconds)} valid ({len(valid.failures)} failed), /healthz p99 "
                f"{percentile_ms(health.seconds, 99)} ms, RSS {rss_samples[-1]:.0f} MB, {file_samples[-1]} fds",
                flush=True,
            )
        stop.set()
        bad.stop.set()
        for thread in threads:
            thread.join(timeout=120)
        rss |= {"end": server.rss_mb(), "max": max(rss_samples)}
        files |= {"during_min": min(file_samples[1:], default=None), "during_max": max(file_samples[1:], default=None)}
        time.sleep(2)  # the server sees the bad connections' ends
        files["after"] = server.open_files()  # what the server still holds once they are gone
    finally:
        server.stop()
    return {
        "model": model,
        "duration_s": args.duration,
        "bad_connections_target": sum(bad.counts.values()),
        "bad_connections_open_mean": round(float(np.mean(bad.open_samples)), 1) if bad.open_samples else 0,
        "closed_by_server": bad.closed_by_server,
        "stalled_replaced": bad.replaced,
        "valid_requests": len(valid.seconds),
        "valid_failed": len(valid.failures),
        "valid_failures_first": valid.failures[:5],
        "valid_p50_ms": percentile_ms(valid.seconds, 50),
        "valid_p99_ms": percentile_ms(valid.seconds, 99),
        "healthz_requests": len(health.seconds),
        "healthz_failed": len(health.failures),
        "healthz_p50_ms": percentile_ms(health.seconds, 50),
        "healthz_p99_ms": percentile_ms(health.seconds, 99),
        "healthz_max_ms": round(1000 * max(health.seconds), 2) if health.seconds else None,
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_mb_every_5_s": [round(v, 1) for v in rss_samples],
        "server_fds": files,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an LM package directory or models:/ URI (default: WORKDIR/export/lm)")
    p.add_argument("--workdir", type=Path, default=Path("gptcore-work"), help="a pipeline work directory")
    p.add_argument("--duration", type=float, default=150.0, help="seconds of soak (default: %(default)s)")
    p.add_argument("--bad", type=int, default=300, help="slowloris + silent + idle connections held open")
    p.add_argument("--stalled", type=int, default=8, help="streams whose readers read nothing")
    p.add_argument("--max-tokens", type=int, default=256, help="of each stalled stream's choices (the server's max)")
    p.add_argument("--clients", type=int, default=4, help="valid clients sending back to back")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    model = args.model or str(args.workdir / "export" / "lm")
    result = soak(model, args)
    for key, value in result.items():
        print(f"{key:28} {value}")
    if args.json:
        write_json(args.json, result)
    if result["valid_failed"] or result["healthz_failed"] or (result["healthz_p99_ms"] or 0) >= 1000:
        sys.exit("valid requests failed, or /healthz p99 reached a second (see above)")


if __name__ == "__main__":
    main()
