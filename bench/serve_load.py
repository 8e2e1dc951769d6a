"""Load on `gptcore serve`: throughput, latency and failures at concurrency 1 and 16, a burst past the
queue bound (429s, no crash), and the server's resident memory before and after.

    python bench/serve_load.py --model gptcore-work/export/lm [--model gptcore-work/export/classifier]
                               [--requests 200] [--duration 20] [--new-tokens 32] [--json out.json]

Starts the server as a subprocess on a free loopback port with a fresh bearer token, sends real
HTTP requests with httpx from threads (one client each), and stops the server at the end. Every
phase is bounded by a request count and a time budget, whichever comes first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

PROMPT = "ROMEO. What light through yonder window breaks?"
TEXTS = [
    "The ship sailed out of the harbour on the morning tide.",
    "Wheat grew tall in the meadow.",
    "A storm rolled over the sea.",
    "The farmer ploughed the field beside the old stone barn.",
] * 2


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"/proc/{pid}/status has no VmRSS line") from None
    return psutil.Process(pid).memory_info().rss / 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(models: list[str], token: str, args) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gptcore.cli",
        "serve",
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-concurrency",
        str(args.max_concurrency),
        "--max-queue",
        str(args.max_queue),
        "--max-new-tokens",
        str(max(args.new_tokens, 1)),
    ]
    for model in models:
        command += ["--model", model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    log = Path(tempfile.mkstemp(prefix="gptcore-serve-", suffix=".log")[1])
    env = {
        **os.environ,
        "GPTCORE_SERVE_TOKEN": token,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if process.poll() is not None:
                sys.exit(f"the server exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                sys.exit(f"the server was not ready within {args.start_timeout} s:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        print(f"(server log: {log})")


def call(client: httpx.Client, url: str, endpoint: str, args, seed: int) -> tuple[int, float, int]:
    """One request: (status, or 0 if it failed to complete; seconds; tokens generated)."""
    body = (
        {"prompt": PROMPT, "max_new_tokens": args.new_tokens, "temperature": 0.8, "top_k": 50, "seed": seed}
        if endpoint == "generate"
        else {"texts": TEXTS}
    )
    start = time.perf_counter()
    try:
        answer = client.post(f"{url}/v1/{endpoint}", json=body, timeout=args.request_timeout)
    except httpx.HTTPError:
        return 0, time.perf_counter() - start, 0
    tokens = answer.json().get("tokens", 0) if answer.status_code == 200 else 0
    return answer.status_code, time.perf_counter() - start, tokens


def load(url: str, token: str, endpoint: str, concurrency: int, args) -> dict:
    """`concurrency` clients, each sending its next request when the last is answered, until the
    request count or the time budget is reached."""
    results, lock, issued = [], threading.Lock(), iter(range(args.requests))
    deadline = time.monotonic() + args.duration

    def client_loop() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            while time.monotonic() < deadline:
                with lock:
                    seed = next(issued, None)
                if seed is None:
                    return
                outcome = call(client, url, endpoint, args, seed)
                with lock:
                    results.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    ok = [(s, t, n) for s, t, n in results if s == 200]
    latencies = np.array([t for _, t, _ in ok]) * 1000 if ok else np.array([np.nan])
    return {
        "phase": "load",
        "endpoint": endpoint,
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "rejected_429": sum(s == 429 for s, _, _ in results),
        "failures": sum(s not in (200, 429) for s, _, _ in results),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(sum(n for _, _, n in ok) / wall, 1) if endpoint == "generate" else None,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }


def burst(url: str, token: str, process: subprocess.Popen, args) -> dict:
    """Twice the server's bound (slots + queue) plus 8 generate requests at once: 429s, no crash."""
    size = 2 * (args.max_concurrency + args.max_queue) + 8
    ready = threading.Barrier(size)

    def one(seed: int) -> tuple[int, float, int]:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            ready.wait(timeout=60)
            return call(client, url, "generate", args, seed)

    start = time.perf_counter()
    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(one, range(size)))
    alive = process.poll() is None and httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    rejected = [t for s, t, _ in results if s == 429]
    return {
        "phase": "burst",
        "endpoint": "generate",
        "concurrency": size,
        "requests": size,
        "ok": sum(s == 200 for s, _, _ in results),
        "rejected_429": len(rejected),
        "failures": sum(s not in (200, 429) for s, _, _ in results),
        "seconds": round(time.perf_counter() - start, 2),
        "slowest_429_ms": round(max(rejected) * 1000, 1) if rejected else None,
        "server_alive": alive,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="package directory or models:/ URI (repeat for an LM and a classifier)",
    )
    p.add_argument("--requests", type=int, default=200, help="at most this many requests per load phase")
    p.add_argument("--duration", type=float, default=20.0, help="at most this many seconds per load phase")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=4, help="the server's (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, help="the server's (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="the server's ONNX Runtime threads per model")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    token = secrets.token_urlsafe(24)
    with server(args.model, token, args) as (url, process):
        kinds = {m["kind"] for m in httpx.get(f"{url}/readyz", timeout=10).json()["models"]}
        endpoints = [e for e, kind in (("generate", "lm"), ("classify", "classifier")) if kind in kinds]
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            for endpoint in endpoints:  # warm up: first calls pay for allocations
                for seed in range(3):
                    call(client, url, endpoint, args, seed)
        rss_before = rss_mb(process.pid)
        rows = [load(url, token, endpoint, c, args) for c in args.concurrency for endpoint in endpoints]
        rss_after_load = rss_mb(process.pid)
        if "generate" in endpoints:
            rows.append(burst(url, token, process, args))
        rss_after = rss_mb(process.pid)

    print(
        f"{'phase':6} {'endpoint':9} {'conc':>4} {'reqs':>5} {'ok':>5} {'429':>4} {'fail':>4} {'req/s':>7} "
        f"{'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for r in rows:
        cells = [("" if r.get(k) is None else r[k]) for k in ("requests_per_s", "tokens_per_s", "p50_ms", "p99_ms")]
        print(
            f"{r['phase']:6} {r['endpoint']:9} {r['concurrency']:>4} {r['requests']:>5} {r['ok']:>5} "
            f"{r['rejected_429']:>4} {r['failures']:>4} " + " ".join(f"{c:>7}" for c in cells)
        )
    burst_row = next((r for r in rows if r["phase"] == "burst"), None)
    if burst_row:
        print(
            f"burst: slowest 429 answered in {burst_row['slowest_429_ms']} ms; server alive after: "
            f"{burst_row['server_alive']}"
        )
    print(
        f"server RSS: {rss_before:.1f} MB after warm-up, {rss_after_load:.1f} MB after the load phases, "
        f"{rss_after:.1f} MB after the burst"
    )
    if args.json:
        write_json(
            args.json,
            {
                "rows": rows,
                "rss_mb": {"warm": rss_before, "after_load": rss_after_load, "after_burst": rss_after},
                "models": args.model,
            },
        )
    if any(r["failures"] for r in rows) or (burst_row and not burst_row["server_alive"]):
        sys.exit("failures under load (see the table)")


if __name__ == "__main__":
    main()
