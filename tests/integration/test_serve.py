"""`gptcore serve` over real HTTP: uvicorn on a free loopback port, the tiny exported packages in real
ONNX Runtime sessions, requests sent with httpx; hot reload against a real SQLite MLflow registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gptcore.runtime import load_model
from gptcore.runtime.serve.admission import Admission, Overloaded
from gptcore.runtime.serve.app import create_app, uvicorn_config
from gptcore.runtime.serve.limits import ServeConfig, ServeLimits
from gptcore.runtime.serve.models import ServedModels
from tests.conftest import REPO

TOKEN = "serve-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ServeLimits(max_concurrency=2, max_queue=4, max_prompt_tokens=64, max_new_tokens=32, max_batch=4)
TEXTS = ["wave salt ship sail tide", "hill field plough barn wheat", ""]
PROMPT = "wave salt ship"


def loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for the port
    return sock


@contextlib.contextmanager
def running(app, ready: bool = True, limits: ServeLimits = LIMITS, send_buffer: int | None = None, **options):
    """The app under uvicorn as `gptcore serve` runs it (its guarded connections, as `limits` say), in
    a thread, on a loopback socket (with a small kernel send buffer if given: accepted sockets inherit
    it); yields its base URL (once it answers /readyz 200 if `ready`)."""
    import uvicorn

    sock = loopback_socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        if ready:
            wait_ready(url)
        else:
            wait_for(lambda: server.started)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_ready(
    url: str, timeout_s: float = 60, process: subprocess.Popen | None = None, log: Path | None = None
) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            answer = httpx.get(f"{url}/readyz", timeout=5)
            if answer.status_code == 200:
                return answer.json()
        time.sleep(0.1)
    raise AssertionError(f"{url} was not ready within {timeout_s} s")


def metric(url: str, line_start: str) -> float:
    """The value of the one sample whose line starts with `line_start` (0 if there is none yet)."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


def sse_events(answer: httpx.Response) -> list:
    return [line[len("data: ") :] for line in answer.text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def server(lm_package, classifier_package):
    """One server with the tiny LM and classifier, small limits, a token."""
    config = ServeConfig([lm_package.package_dir, classifier_package.package_dir], LIMITS, device="cpu")
    with running(create_app(config, TOKEN)) as url:
        yield url


def test_generate_greedy_is_the_runtime_greedy_and_a_stream_joins_to_it(server, lm_package):
    lm = load_model(lm_package.package_dir, device="cpu")
    expected = lm.generate(PROMPT, max_new_tokens=20, temperature=0)
    answer = httpx.post(
        f"{server}/v1/generate",
        headers=AUTH,
        timeout=60,
        json={"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["text"] == expected
    assert body["tokens"] == len(lm.generate_ids(lm.encode(PROMPT), 20, temperature=0))
    assert body["prompt_tokens"] == len(lm.encode(PROMPT))
    assert body["model"] == lm_package.package_dir and body["version"] is None

    streamed = httpx.post(
        f"{server}/v1/generate",
        headers=AUTH,
        timeout=60,
        json={"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0, "stream": True},
    )
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    *pieces, final, done = sse_events(streamed)
    assert done == "[DONE]" and len(pieces) >= 1
    assert "".join(json.loads(p)["text"] for p in pieces) == expected
    assert json.loads(final)["tokens"] == body["tokens"] and json.loads(final)["finish_reason"] == body["finish_reason"]

    sampled = {"prompt": PROMPT, "max_new_tokens": 16, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3}
    first, again = (
        httpx.post(f"{server}/v1/generate", headers=AUTH, json=sampled, timeout=60).json() for _ in range(2)
    )
    assert first["text"] == again["text"] == lm.generate(PROMPT, 16, 0.9, 20, 0.9, seed=3)


def test_classify_answers_what_the_runtime_answers(server, classifier_package):
    clf = load_model(classifier_package.package_dir, device="cpu")
    answer = httpx.post(f"{server}/v1/classify", headers=AUTH, json={"texts": TEXTS}, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["label"] for r in results] == [r["label"] for r in clf.classify(TEXTS)]
    for got, want in zip(results, clf.classify(TEXTS)):
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-6)
        assert sorted(got["probabilities"]) == sorted(clf.labels)


def test_health_readiness_and_metrics_move(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["ready"] and sorted(m["kind"] for m in ready["models"]) == ["classifier", "lm"]
    assert {m["provider"] for m in ready["models"]} == {"CPUExecutionProvider"}

    ok = 'gptcore_http_requests_total{endpoint="/v1/classify",status="200"}'
    rejected = 'gptcore_rejected_requests_total{reason="invalid"}'
    tokens = "gptcore_generated_tokens_total"
    before = {name: metric(server, name) for name in (ok, rejected, tokens)}
    httpx.post(f"{server}/v1/classify", headers=AUTH, json={"texts": TEXTS[:1]}, timeout=60)
    httpx.post(f"{server}/v1/classify", headers=AUTH, json={"texts": []}, timeout=60)
    new = httpx.post(
        f"{server}/v1/generate",
        headers=AUTH,
        json={"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0},
        timeout=60,
    ).json()["tokens"]
    assert metric(server, ok) == before[ok] + 1
    assert metric(server, rejected) == before[rejected] + 1
    assert metric(server, tokens) == before[tokens] + new
    assert metric(server, 'gptcore_http_request_seconds_count{endpoint="/v1/generate"}') >= 1
    assert metric(server, "gptcore_queue_depth") == 0


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/generate", {"prompt": "a", "max_new_tokens": 1}),
        ("POST", "/v1/classify", {"texts": ["a"]}),
        ("GET", "/metrics", None),
    ],
)
def test_a_token_is_needed_except_for_health(server, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        answer = httpx.request(method, f"{server}{path}", headers=headers, json=body, timeout=30)
        assert answer.status_code == 401 and "bearer token" in answer.json()["error"]
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.request(method, f"{server}{path}", headers=AUTH, json=body, timeout=30).status_code == 200
    assert httpx.get(f"{server}/healthz").status_code == httpx.get(f"{server}/readyz").status_code == 200


LONG_PROMPT = " ".join(["wave", "hill", "storm", "meadow"] * 40)  # more than 64 tokens, under 64 * 16 characters


@pytest.mark.parametrize(
    "path, body, status, named",
    [
        ("/v1/generate", {"prompt": ""}, 422, "prompt"),
        ("/v1/generate", {"prompt": LONG_PROMPT}, 422, "prompt: "),
        ("/v1/generate", {"prompt": "x" * (64 * 16 + 1)}, 422, "prompt"),
        ("/v1/generate", {"prompt": "a", "max_new_tokens": 33}, 422, "max_new_tokens"),
        ("/v1/generate", {"prompt": "a", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ("/v1/generate", {"prompt": "a", "temperature": -1}, 422, "temperature"),
        ("/v1/generate", {"prompt": "a", "top_p": 0}, 422, "top_p"),
        ("/v1/generate", {"prompt": "a", "top_k": 0}, 422, "top_k"),
        ("/v1/generate", {"prompt": "a", "seed": -1}, 422, "seed"),
        ("/v1/generate", {"prompt": 5}, 422, "prompt"),
        ("/v1/generate", {"prompt": "a", "max_new_tokens": "8"}, 422, "max_new_tokens"),
        ("/v1/generate", {"prompt": "a", "stream": "yes"}, 422, "stream"),
        ("/v1/generate", {"prompt": "a", "beams": 4}, 422, "beams"),
        ("/v1/generate", {}, 422, "prompt"),
        ("/v1/classify", {"texts": ["a"] * 5}, 422, "texts"),
        ("/v1/classify", {"texts": ["a", 3]}, 422, "texts[1]"),
        ("/v1/classify", {"texts": "a"}, 422, "texts"),
        ("/v1/classify", {"texts": ["x" * (64 * 16 + 1)]}, 422, "texts[0]"),
        ("/v1/classify", ["a"], 422, "body"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(server, path, body, status, named):
    answer = httpx.post(f"{server}{path}", headers=AUTH, json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert named in answer.json()["error"], answer.json()


def test_malformed_and_oversized_bodies(server):
    broken = httpx.post(
        f"{server}/v1/generate",
        headers={**AUTH, "Content-Type": "application/json"},
        content=b'{"prompt": ',
        timeout=30,
    )
    assert broken.status_code == 422 and "body: not valid JSON at character 11" in broken.json()["error"]
    huge = b'{"texts": ["' + b"a" * LIMITS.max_body_bytes + b'"]}'
    assert httpx.post(f"{server}/v1/classify", headers=AUTH, content=huge, timeout=30).status_code == 413

    def chunks():  # no Content-Length: the cap applies as the body arrives
        yield b'{"texts": ["'
        for _ in range(LIMITS.max_body_bytes // 65536 + 2):
            yield b"a" * 65536
        yield b'"]}'

    chunked = httpx.post(f"{server}/v1/classify", headers=AUTH, content=chunks(), timeout=30)
    assert chunked.status_code == 413 and "at most" in chunked.json()["error"]
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_not_ready_while_loading_and_a_failed_load_says_why(lm_package, tmp_path):
    loading = threading.Event()

    def load_when_let(uri: str, download_dir=None):  # the real loader, held back until the test has looked
        loading.wait(timeout=60)
        return load_model(uri, device="cpu")

    config = ServeConfig([lm_package.package_dir], LIMITS, device="cpu")
    with running(create_app(config, TOKEN, ServedModels(config.models, load_when_let)), ready=False) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503
        busy = httpx.post(f"{url}/v1/generate", headers=AUTH, json={"prompt": "a"}, timeout=30)
        assert busy.status_code == 503 and "still loading" in busy.json()["error"]
        loading.set()
        assert wait_ready(url)["models"][0]["variant"] == "fp32"

    failures = []
    missing = ServeConfig([str(tmp_path / "nowhere")], LIMITS, device="cpu")
    with running(create_app(missing, TOKEN, on_load_failure=failures.append), ready=False) as url:
        wait_for(lambda: failures)
        answer = httpx.get(f"{url}/readyz", headers=AUTH)  # why, with the token: the open answer names no path
        assert answer.status_code == 503 and "nowhere: no such model package directory" in answer.json()["error"]
    assert "nowhere" in failures[0]


def test_admission_bounds_running_and_waiting_work():
    async def scenario():
        admission = Admission(max_concurrency=2, max_queue=1)
        gate = threading.Event()
        running = [asyncio.create_task(admission.run(gate.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(admission.run(lambda: "queued"))
        await asyncio.sleep(0.05)
        assert (admission.running, admission.waiting) == (2, 1)
        with pytest.raises(Overloaded):
            await admission.run(lambda: "one too many")
        gate.set()
        assert await asyncio.gather(*running, queued) == [True, True, "queued"]
        assert (admission.running, admission.waiting) == (0, 0)
        admission.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("batching", ["per-request", "continuous"])
def test_over_the_queue_bound_is_429_at_once(lm_package, batching):
    """One slot (a model thread, or an engine row), one place in the queue: a third request while two
    are in is turned away, with Retry-After."""
    limits = ServeLimits(
        max_concurrency=1, max_queue=1, max_prompt_tokens=64, max_new_tokens=2048, max_batch=4, max_running=1
    )
    slow = {"prompt": PROMPT, "max_new_tokens": 2048, "temperature": 0}
    config = ServeConfig([lm_package.package_dir], limits, batching, device="cpu", threads=1)
    waiting = "gptcore_queue_depth" if batching == "per-request" else 'gptcore_engine_waiting{model="lm"}'
    with running(create_app(config, TOKEN)) as url:

        def post(results: list) -> None:
            results.append(httpx.post(f"{url}/v1/generate", headers=AUTH, json=slow, timeout=120))

        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=post, args=(answers,)) for _ in range(2)]
        threads[0].start()
        wait_for(lambda: metric(url, "gptcore_model_calls_in_flight") == 1)
        threads[1].start()
        wait_for(lambda: metric(url, waiting) == 1)
        start = time.monotonic()
        turned_away = httpx.post(f"{url}/v1/generate", headers=AUTH, json=slow, timeout=120)
        assert turned_away.status_code == 429 and turned_away.headers["Retry-After"] == "1"
        assert time.monotonic() - start < 2 and "busy" in turned_away.json()["error"]
        for t in threads:
            t.join(timeout=120)
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["finish_reason"] == "length"  # it was still running when the third came
        assert metric(url, 'gptcore_rejected_requests_total{reason="overloaded"}') == 1
        assert httpx.get(f"{url}/readyz").status_code == 200


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def free_port() -> int:
    with loopback_socket() as sock:
        return sock.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptcore.cli", "serve", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GPTCORE_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_no_token_means_loopback_only(lm_package, tmp_path):
    refused = subprocess.run(
        serve_command(
            "--model",
            lm_package.package_dir,
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--workdir",
            str(tmp_path),
        ),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "--host 0.0.0.0: not a loopback address" in refused.stderr and "GPTCORE_SERVE_TOKEN" in refused.stderr


def test_a_model_that_cannot_load_ends_the_server_with_an_error(tmp_path):
    ended = subprocess.run(
        serve_command("--model", str(tmp_path / "nowhere"), "--port", str(free_port()), "--workdir", str(tmp_path)),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ended.returncode == 2
    assert (
        "gptcore serve: error: cannot load the models:" in ended.stderr
        and "nowhere: no such model package" in ended.stderr
    )


def test_hot_reload_follows_the_alias_and_survives_a_broken_version(lm_package, mlflow_tracking, tmp_path):
    """`gptcore serve --model models:/NAME@champion` serves the version the alias names, as it moves."""
    from gptcore.layout import CHAMPION
    from gptcore.registry.register import register

    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    for i, bpb in enumerate((2.0, 2.5)):
        (evaluation / f"e{i}.json").write_text(json.dumps({"test": {"bpb": bpb}}))
    first = register(lm_package.package_dir, evaluation / "e0.json", "served-lm", mlflow_tracking)
    second = register(lm_package.package_dir, evaluation / "e1.json", "served-lm", mlflow_tracking)
    assert first.promoted and not second.promoted

    port, uri, log = free_port(), mlflow_tracking.settings.tracking_uri, tmp_path / "serve.log"
    with open(log, "w") as log_file:  # a file, not a pipe nobody reads: the server never blocks on its log
        process = subprocess.Popen(
            serve_command(
                "--model",
                "models:/served-lm@champion",
                "--port",
                str(port),
                "--reload-interval",
                "0.3",
                "--device",
                "cpu",
                "--workdir",
                str(tmp_path),
            ),
            cwd=tmp_path,
            env=clean_env(MLFLOW_TRACKING_URI=uri, GPTCORE_SERVE_TOKEN=TOKEN),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_ready(url, 120, process, log)["models"][0]["version"] == first.version
        ask = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/generate", headers=AUTH, json=ask, timeout=60).json()["version"] == first.version

        client = mlflow_tracking.client()
        client.set_registered_model_alias("served-lm", CHAMPION, second.version)
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["models"][0]["version"] == second.version, 60)
        assert httpx.post(f"{url}/v1/generate", headers=AUTH, json=ask, timeout=60).json()["version"] == second.version
        assert metric(url, 'gptcore_model_reloads_total{outcome="reloaded"}') == 1

        empty = tmp_path / "not-a-package"
        empty.mkdir()
        broken = client.create_model_version("served-lm", source=str(empty)).version
        client.set_registered_model_alias("served-lm", CHAMPION, broken)
        wait_for(lambda: metric(url, 'gptcore_model_reloads_total{outcome="failed"}') >= 1, 60)
        assert httpx.get(f"{url}/readyz").json()["models"][0]["version"] == second.version
        assert httpx.post(f"{url}/v1/generate", headers=AUTH, json=ask, timeout=60).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            # uvicorn shuts down cleanly on SIGTERM, then ends by the signal it caught, as supervisors expect
            assert process.wait(timeout=60) == -signal.SIGTERM, log.read_text()
        finally:
            process.kill()
    served_log = log.read_text()
    assert "Application shutdown complete" in served_log and "now serves version" in served_log
    assert "reloading models:/served-lm@champion failed, still serving version" in served_log


def test_engine_batches_concurrent_requests_as_each_alone_and_reports_its_metrics(lm_package):
    """Eight clients at once through one engine: each greedy answer is the one the model gives that
    prompt alone, the engine decoded several in one step, and /metrics has TTFT and ITL."""
    lm = load_model(lm_package.package_dir, device="cpu")
    prompts = [("wave", 5), ("salt ship wave salt ship", 30), ("field", 12), ("ship salt", 20)] * 2
    alone = [lm.generate(p, max_new_tokens=n, temperature=0.0) for p, n in prompts]
    config = ServeConfig([lm_package.package_dir], LIMITS, device="cpu", threads=1)
    with running(create_app(config, TOKEN)) as url:
        barrier = threading.Barrier(len(prompts))

        def ask(prompt_and_tokens) -> str:
            prompt, n = prompt_and_tokens
            barrier.wait(timeout=30)
            body = {"prompt": prompt, "max_new_tokens": n, "temperature": 0, "stream": n % 2 == 0}
            answer = httpx.post(f"{url}/v1/generate", headers=AUTH, json=body, timeout=120)
            assert answer.status_code == 200, answer.text
            if not body["stream"]:
                return answer.json()["text"]
            return "".join(json.loads(e)["text"] for e in sse_events(answer)[:-2])  # the end event, [DONE]

        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, prompts))
        assert together == alone
        assert metric(url, 'gptcore_time_to_first_token_seconds_count{model="lm"}') == len(prompts)
        assert metric(url, 'gptcore_inter_token_seconds_count{model="lm"}') > 0
        single_steps = metric(url, 'gptcore_engine_step_tokens_bucket{le="1.0",model="lm"}')
        assert metric(url, 'gptcore_engine_step_tokens_count{model="lm"}') > single_steps  # batched steps
        assert httpx.get(f"{url}/readyz").json()["models"][0]["batching"] == "continuous"
