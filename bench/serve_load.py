"""`gptcore serve` under load: the continuous-batching engine against the per-request path, and
both against the offline ceiling of the same graph.

    python bench/serve_load.py --workdir gptcore-work [--models default gpt2-124m] [--json out.json]
                               [--paths engine per-request] [--concurrency 1 16 64]
                               [--requests 64] [--duration 60] [--device cpu] [--threads N]
    python bench/serve_load.py --model path/to/lm-package ...     (an ad-hoc run on a given package)

Models: `default`, the LM of a pipeline work directory (`gptcore pipeline --workdir DIR` first),
and `gpt2-124m`, GPT-2 small's shape with random weights; both exported here, fp32, as
`kv_cache.py` exports them. For each model:
- offline: `generate_batch_ids` on 16 prompts of 128 tokens, 128 new each (both cut to fit the
  context), greedy, in this process before any server starts: decoding and nothing else;
- for each path (`--batching continuous`, `--batching per-request`), a server of its own, and
  for each concurrency a load phase: that many clients, each sending its next request when the
  last has ended, until `--requests` were sent or `--duration` seconds passed (requests then in
  flight finish). Every phase sends the same seeded workload: prompts of 16-512 tokens (random
  token ids decoded with the package's tokenizer) asking for 32-128 tokens, both cut to fit the
  context (see `workload`), sampled (temperature 0.8, top-k 50) with a seed per request.

Requests stream (/v1/generate, "stream": true): time to first token (TTFT) runs from sending the
request to its first text event, inter-token latency (ITL) is the gap between successive text
events (an event holds a token, or a few when a character spans tokens). Rows: requests/s and
output tokens/s over the phase's wall time, TTFT and ITL p50/p99, requests refused with 429
(`rejected`) and those that failed otherwise (`failed`: another status, a broken stream), the
server's resident memory before and after. The server's queue is sized so that no request of a
phase needs refusing: any 429 says something is wrong.

The server runs as a subprocess on a free loopback port with a fresh bearer token; its log's path
is printed. On a 2-core CPU the clients share the cores with the server: compare paths measured
in one run, on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import timed  # bench/inference.py: best of timed calls after a warm-up
from kv_cache import lm_package, load_source  # bench/kv_cache.py: the packages, exported alike
from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.runtime import load_model, load_package

BATCHING = {"engine": "continuous", "per-request": "per-request"}  # a row's path -> the server's --batching
OFFLINE_BATCH, OFFLINE_PROMPT, OFFLINE_NEW = 16, 128, 128
SAMPLING = {"temperature": 0.8, "top_k": 50}
WARMUP_REQUESTS = 4  # sent before the first phase: the first calls at new shapes pay for allocations


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int
    seed: int


@dataclasses.dataclass
class Outcome:
    """One request as the client saw it."""

    status: int  # 0: no answer (a transport error or a timeout)
    broken: bool = False  # answered 200, then an error event or no final event
    ttft: float | None = None  # seconds from sending to the first text event
    gaps: list[float] = dataclasses.field(default_factory=list)  # seconds between successive text events
    tokens: int = 0  # generated, as the final event says
    prompt_tokens: int = 0  # as the server counted them

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.broken


def workload(package: Path, args) -> list[Request]:
    """`args.requests` seeded requests for `package`'s model.

    Both draws are cut so that prompt and generation fit the context: max_tokens to half of it,
    the prompt to the rest (and --max-prompt-tokens). A generation past the context would slide
    its window and write the whole context again at every token, on both paths: a measure of
    prefill, not of decoding. gpt2-124m (1024) keeps the full ranges; a model of 128 tokens
    gets prompts of 16-96 tokens asking for 32-64.
    """
    pkg = load_package(package)
    tok, block = pkg.tokenizer, pkg.meta["block_size"]
    rng = np.random.default_rng(args.seed)
    requests = []
    while len(requests) < args.requests:
        max_tokens = min(int(rng.integers(args.max_tokens[0], args.max_tokens[1] + 1)), block // 2)
        cap = min(args.max_prompt_tokens, block - max_tokens)
        n = min(int(rng.integers(args.prompt_tokens[0], args.prompt_tokens[1] + 1)), cap)
        text = text_of(tok, rng.integers(0, tok.get_vocab_size(), n).tolist())
        # Decoded ids need not encode back to as many (merges differ): trim to n, which shortens
        # the text each time (without the replacement characters, the cut can not grow it back).
        while len(ids := tok.encode(text, add_special_tokens=False).ids) > n:
            text = text_of(tok, ids[:n])
        if text.strip():  # ids that are all special tokens decode to nothing: draw again
            requests.append(Request(text, max_tokens, len(requests)))
    return requests


def text_of(tok, ids: list[int]) -> str:
    """The text of `ids`, without the replacement characters that stand for bytes cut mid-character."""
    return tok.decode(ids, skip_special_tokens=True).replace("\ufffd", "")


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


def server_command(package: Path, path: str, port: int, args) -> list[str]:
    command = [sys.executable, "-m", "gptcore.cli", "serve", "--model", str(package), "--port", str(port)]
    command += ["--device", args.device, "--batching", BATCHING[path], "--max-queue", str(max(args.concurrency))]
    command += ["--max-new-tokens", str(args.max_tokens[1]), "--max-prompt-tokens", str(args.max_prompt_tokens)]
    # The other knobs keep the server's defaults unless given; each path reads only its own.
    options = {"--threads": args.threads}
    if path == "engine":
        options |= {"--max-running": args.max_running, "--kv-tokens": args.kv_tokens}
    else:
        options |= {"--max-concurrency": args.max_concurrency}
    for flag, value in options.items():
        if value is not None:
            command += [flag, str(value)]
    return command


@contextlib.contextmanager
def server(package: Path, path: str, token: str, args) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"gptcore-serve-{path}-", suffix=".log")[1])
    env = {
        **os.environ,
        "GPTCORE_SERVE_TOKEN": token,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            server_command(package, path, port, args), env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if process.poll() is not None:
                sys.exit(f"the server exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                sys.exit(f"the server was not ready within {args.start_timeout} s:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                ready = httpx.get(f"{url}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            time.sleep(0.2)
        batching = {m.get("batching") for m in ready.json()["models"]}
        if batching != {BATCHING[path]}:  # a flag the server ignored would compare a path with itself
            sys.exit(f"asked the server for --batching {BATCHING[path]}; /readyz says {batching}")
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        print(f"  (server log: {log})", flush=True)


def stream_one(client: httpx.Client, url: str, request: Request, timeout: float) -> Outcome:
    """One streamed generation: SSE `data: {"text": ...}` events, a final one with the counts, `data: [DONE]`."""
    body = {"prompt": request.prompt, "max_new_tokens": request.max_tokens, "seed": request.seed, "stream": True}
    start, pieces, final = time.perf_counter(), [], None
    try:
        with client.stream("POST", f"{url}/v1/generate", json=body | SAMPLING, timeout=timeout) as answer:
            if answer.status_code != 200:
                answer.read()
                return Outcome(answer.status_code)
            for line in answer.iter_lines():
                if line.startswith("event: error"):
                    return Outcome(200, broken=True)
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "text" in event:
                    pieces.append(time.perf_counter())
                else:
                    final = event
    except httpx.HTTPError:
        return Outcome(0)
    if final is None:
        return Outcome(200, broken=True)
    return Outcome(
        200,
        ttft=pieces[0] - start if pieces else None,
        gaps=np.diff(pieces).tolist(),
        tokens=final["tokens"],
        prompt_tokens=final["prompt_tokens"],
    )


def load(url: str, token: str, requests: list[Request], concurrency: int, args) -> tuple[list[Outcome], float]:
    """`concurrency` clients sending `requests` in order, each its next when the last has ended,
    until all were sent or the phase's time is up; the outcomes and the wall time."""
    outcomes, lock, issued = [], threading.Lock(), iter(requests)
    deadline = time.monotonic() + args.duration

    def client_loop() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            while time.monotonic() < deadline:
                with lock:
                    request = next(issued, None)
                if request is None:
                    return
                outcome = stream_one(client, url, request, args.request_timeout)
                with lock:
                    outcomes.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    return outcomes, time.perf_counter() - start


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 2) if values else None


def row(model: str, path: str, concurrency: int, outcomes: list[Outcome], wall: float, rss: tuple) -> dict:
    ok = [o for o in outcomes if o.ok]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    gaps = [g for o in ok for g in o.gaps]
    return {
        "model": model,
        "path": path,
        "concurrency": concurrency,
        "requests": len(outcomes),
        "ok": len(ok),
        "rejected": sum(o.status == 429 for o in outcomes),
        "failed": sum(not o.ok and o.status != 429 for o in outcomes),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(sum(o.tokens for o in ok) / wall, 1),
        "prompt_tokens_mean": round(float(np.mean([o.prompt_tokens for o in ok])), 1) if ok else None,
        "output_tokens_mean": round(float(np.mean([o.tokens for o in ok])), 1) if ok else None,
        "ttft_p50_ms": percentile_ms(ttfts, 50),
        "ttft_p99_ms": percentile_ms(ttfts, 99),
        "itl_p50_ms": percentile_ms(gaps, 50),
        "itl_p99_ms": percentile_ms(gaps, 99),
        "rss_mb_before": round(rss[0], 1),
        "rss_mb_after": round(rss[1], 1),
    }


def offline(model: str, package: Path, args) -> dict:
    """The ceiling: one batch of OFFLINE_BATCH greedy generations in this process (prefill included)."""
    lm = load_model(package, device=args.device, threads=args.threads)
    prompt = min(OFFLINE_PROMPT, lm.block_size // 2)  # within the context, as the workload is
    new = min(OFFLINE_NEW, lm.block_size - prompt)
    prompts = np.random.default_rng(args.seed).integers(0, lm.tokenizer.get_vocab_size(), (OFFLINE_BATCH, prompt))

    def run(warmup: bool) -> None:
        lm.generate_batch_ids(prompts.tolist(), 4 if warmup else new, temperature=0.0, stop_at_eos=False)

    seconds, _ = timed(run, 1)
    empty = dict.fromkeys(("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "rss_mb_before", "rss_mb_after"))
    return {
        "model": model,
        "path": "offline",
        "concurrency": OFFLINE_BATCH,
        "requests": OFFLINE_BATCH,
        "ok": OFFLINE_BATCH,
        "rejected": 0,
        "failed": 0,
        "seconds": round(seconds, 2),
        "requests_per_s": round(OFFLINE_BATCH / seconds, 3),
        "output_tokens_per_s": round(OFFLINE_BATCH * new / seconds, 1),
        "prompt_tokens_mean": prompt,
        "output_tokens_mean": new,
    } | empty


def bench_model(model: str, package: Path, args) -> list[dict]:
    requests = workload(package, args)
    rows = [offline(model, package, args)]
    print(f"{model}: offline {rows[0]['output_tokens_per_s']} tokens/s", flush=True)
    token = secrets.token_urlsafe(24)
    for path in args.paths:
        with server(package, path, token, args) as (url, process):
            load(url, token, [dataclasses.replace(r, max_tokens=8) for r in requests[:WARMUP_REQUESTS]], 4, args)
            for concurrency in args.concurrency:
                before = rss_mb(process.pid)
                outcomes, wall = load(url, token, requests, concurrency, args)
                rows.append(row(model, path, concurrency, outcomes, wall, (before, rss_mb(process.pid))))
                r = rows[-1]
                print(
                    f"  {path} x{concurrency}: {r['ok']}/{r['requests']} ok in {r['seconds']} s, "
                    f"{r['output_tokens_per_s']} tokens/s",
                    flush=True,
                )
    return rows


def cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_tables(rows: list[dict]) -> None:
    head = (
        f"{'model':10} {'path':11} {'conc':>4} {'reqs':>4} {'rej':>3} {'fail':>4} {'req/s':>7} {'out tok/s':>9} "
        f"{'TTFT p50':>8} {'p99':>8} {'ITL p50':>7} {'p99':>7} {'RSS MB':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = "" if r["rss_mb_before"] is None else f"{r['rss_mb_before']:.0f}->{r['rss_mb_after']:.0f}"
        print(
            f"{r['model']:10} {r['path']:11} {r['concurrency']:>4} {r['requests']:>4} {r['rejected']:>3} "
            f"{r['failed']:>4} {r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>9.1f} "
            f"{cell(r['ttft_p50_ms'], 8, 1)} {cell(r['ttft_p99_ms'], 8, 1)} "
            f"{cell(r['itl_p50_ms'], 7, 2)} {cell(r['itl_p99_ms'], 7, 2)} {rss:>13}"
        )
    print(f"\noutput tokens/s ratios (offline: batch {OFFLINE_BATCH})")
    by = {(r["model"], r["path"], r["concurrency"]): r["output_tokens_per_s"] for r in rows}
    for model, concurrency in dict.fromkeys((r["model"], r["concurrency"]) for r in rows if r["path"] == "engine"):
        engine, per_request = by[model, "engine", concurrency], by.get((model, "per-request", concurrency))
        vs_per_request = f"{engine / per_request:.2f}x" if per_request else "-"
        print(
            f"  {model:10} concurrency {concurrency:>3}: engine / per-request {vs_per_request:>7}, "
            f"engine / offline {engine / by[model, 'offline', OFFLINE_BATCH]:.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("gptcore-work"), help="a pipeline work directory")
    p.add_argument("--models", nargs="+", default=["default", "gpt2-124m"], choices=["default", "gpt2-124m"])
    p.add_argument("--model", type=Path, help="an LM package to load instead of --models (named after its directory)")
    p.add_argument("--paths", nargs="+", default=list(BATCHING), choices=list(BATCHING))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests", type=int, default=64, help="requests per phase at most (default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds a phase sends requests for at most")
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="the server's; prompts are cut to it")
    p.add_argument("--seed", type=int, default=0, help="of the workload")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="ONNX Runtime's intra-op threads, the server's and offline")
    p.add_argument("--max-running", type=int, help="the engine's rows (default: the server's)")
    p.add_argument("--kv-tokens", type=int, help="the engine's KV budget in slots (default: the server's)")
    p.add_argument("--max-concurrency", type=int, help="the per-request path's threads (default: the server's)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="gptcore-bench-serve-") as tmp:
        if args.model:
            packages = {args.model.resolve().name: args.model}
        else:
            packages = {name: lm_package(load_source(name, args.workdir), Path(tmp) / name) for name in args.models}
        for model, package in packages.items():
            rows += bench_model(model, package, args)
    print_tables(rows)
    if args.json:
        write_json(args.json, rows)
    if any(r["failed"] or r["rejected"] for r in rows):
        sys.exit("requests failed or were refused under load (see the table)")


if __name__ == "__main__":
    main()
