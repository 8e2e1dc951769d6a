"""Registered versions as MLflow pyfunc models: loaded by `mlflow.pyfunc`, served by `mlflow models serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from gptcore.registry.register import VARIANT_TAG_PREFIX, register
from gptcore.runtime import load_model, resolve_model_uri
from gptcore.runtime.package import FILES
from gptcore.tracking import Tracking, TrackingSettings
from tests.unit.registry.test_register import eval_file

PROMPTS = ["wave salt ship", "hill field"]
TEXTS = ["wave salt ship sail tide anchor", "hill field plough barn wheat", ""]
CONVERSATION = [
    {"role": "user", "content": "wave salt ship"},
    {"role": "assistant", "content": "sea: wave wave"},
    {"role": "user", "content": "again?"},
]
SERVE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def versions(lm_package, classifier_package, tmp_path_factory):
    """The tiny LM and classifier registered (champions of `lm` and `clf`) in one SQLite store,
    which is also MLflow's default through MLFLOW_TRACKING_URI (as `mlflow.pyfunc` reads it)."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root}/mlflow.db"
    tracking = Tracking(
        TrackingSettings(
            tracking_uri=uri, registry_uri=None, artifact_location=str(root / "artifacts"), experiment="pyfunc"
        )
    )
    register(lm_package.package_dir, eval_file(root / "lm.json", "test", "bpb", 2.0), "lm", tracking)
    register(classifier_package.package_dir, eval_file(root / "clf.json", "test", "macro_f1", 0.9), "clf", tracking)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield {
            "uri": uri,
            "tracking": tracking,
            "lm": Path(lm_package.package_dir),
            "clf": Path(classifier_package.package_dir),
        }


@pytest.fixture(scope="module")
def chat_version(versions, chat_package, chat_trained):
    """The tiny chat model registered (champion of `chat`) beside them, by its evaluation; its package."""
    register(chat_package.package_dir, chat_trained["report"].metrics_path, "chat", versions["tracking"])
    return Path(chat_package.package_dir)


def test_lm_pyfunc_generates_what_the_runtime_generates(versions):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/lm@champion")
    runtime = load_model(versions["lm"], device="cpu")
    rows = pd.DataFrame({"prompt": PROMPTS, "max_new_tokens": [5, 12]})  # per-row settings over params
    out = model.predict(rows, params={"temperature": 0.0, "max_new_tokens": 30})
    assert list(out.columns) == ["text"]
    assert out["text"].tolist() == [
        runtime.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(PROMPTS, [5, 12])
    ]
    sampled = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"seed": 3, "top_k": 20, "max_new_tokens": 8})
    assert sampled["text"].tolist() == [runtime.generate(p, max_new_tokens=8, top_k=20, seed=3) for p in PROMPTS]

    with pytest.raises(MlflowException, match=r"row 0: temperature: must be a finite number >= 0"):
        model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"temperature": -1.0})
    with pytest.raises(MlflowException, match=r"row 1: prompt: must be a non-empty string"):
        model.predict(pd.DataFrame({"prompt": ["wave", ""]}))
    with pytest.raises(MlflowException, match=r"missing inputs \['prompt'\]"):
        model.predict(pd.DataFrame({"text": PROMPTS}))


def test_classifier_pyfunc_matches_predict_proba(versions):
    import mlflow.pyfunc

    out = mlflow.pyfunc.load_model("models:/clf@champion").predict(pd.DataFrame({"text": TEXTS}))
    runtime = load_model(versions["clf"], device="cpu")
    probs = runtime.predict_proba(TEXTS)
    assert list(out.columns) == ["label", "confidence", *(f"prob_{label}" for label in runtime.labels)]
    np.testing.assert_allclose(out[[f"prob_{label}" for label in runtime.labels]].to_numpy(), probs, atol=1e-6)
    assert out["label"].tolist() == [runtime.labels[k] for k in probs.argmax(axis=1)]
    np.testing.assert_allclose(out["confidence"].to_numpy(), probs.max(axis=1), atol=1e-6)
    assert out["label"][0] == "sea" and out["label"][1] == "land"


def expected_completion(bot, messages: list[dict], max_tokens: int, **sampling) -> dict:
    """What the chat pyfunc answers: `OnnxChat.chat`'s answer, with its token counts and why it ended."""
    prompt_ids, dropped = bot.prompt(messages, max_tokens)
    decoded = len(bot.generate_ids(prompt_ids, max_tokens, **sampling))
    return {
        "dropped_messages": dropped,
        "message": {"role": "assistant", "content": bot.chat(messages, max_tokens, **sampling)},
        "finish_reason": "length" if decoded == max_tokens else "stop",
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": decoded,
            "total_tokens": len(prompt_ids) + decoded,
        },
    }


def check_completion(completion: dict, expected: dict) -> None:
    """`completion` is an OpenAI-style chat completion with `expected`'s answer."""
    assert completion["object"] == "chat.completion" and completion["id"].startswith("chatcmpl-")
    assert isinstance(completion["created"], int) and completion["model"] == "gptcore-chat"
    (choice,) = completion["choices"]
    assert choice["index"] == 0 and choice["message"] == expected["message"]
    assert choice["finish_reason"] == expected["finish_reason"]
    assert completion["usage"] == expected["usage"]
    assert completion["custom_outputs"] == {"dropped_messages": expected["dropped_messages"], "variant": "fp32"}


def test_chat_pyfunc_answers_in_mlflow_chat_schema_as_onnx_chat(versions, chat_version):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

    model = mlflow.pyfunc.load_model("models:/chat@champion")
    signature = model.metadata.signature
    assert signature.inputs == CHAT_MODEL_INPUT_SCHEMA and signature.outputs == CHAT_MODEL_OUTPUT_SCHEMA
    bot = load_model(chat_version, device="cpu")
    greedy = model.predict({"messages": CONVERSATION, "max_tokens": 8, "temperature": 0.0})
    check_completion(greedy, expected_completion(bot, CONVERSATION, 8, temperature=0.0))
    sampled = model.predict({"messages": CONVERSATION[:1], "max_tokens": 5, "top_k": 20}, params={"seed": 3})
    check_completion(sampled, expected_completion(bot, CONVERSATION[:1], 5, top_k=20, seed=3))
    stopped = model.predict({"messages": CONVERSATION, "max_tokens": 8, "temperature": 0.0, "stop": [":"]})
    answer = greedy["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["message"]["content"] == answer.split(":")[0]
    assert ":" not in answer or stopped["choices"][0]["finish_reason"] == "stop"
    # the context of 32 tokens leaves 24 to the conversation: its oldest turn went, and the answer says so
    assert greedy["custom_outputs"]["dropped_messages"] == 1 and sampled["custom_outputs"]["dropped_messages"] == 0

    for request, message in [
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role: must be one of system, user, assistant",
        ),
        ({"messages": CONVERSATION[:2]}, "messages[1].role: the last message must be the user's"),
        ({"messages": CONVERSATION, "top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"messages": CONVERSATION, "max_tokens": 32}, "max_tokens: the answer must leave the context of 32 tokens"),
        ({"messages": CONVERSATION, "n": 2}, "n: this model supports only 1, got 2"),
        ({"messages": CONVERSATION, "stream": True}, "stream: this model supports only False, got True"),
    ]:
        with pytest.raises(MlflowException, match=re.escape(message)):
            model.predict(request)


def test_registered_version_is_a_pickle_free_pyfunc_holding_the_package(versions):
    from mlflow.artifacts import download_artifacts

    model_dir = Path(download_artifacts("models:/lm@champion"))
    assert (model_dir / "MLmodel").is_file() and (model_dir / "pyfunc_model.py").is_file()
    assert not list(model_dir.rglob("*.pkl")), "models from code: nothing may be pickled"
    requirements = (model_dir / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements

    # gptcore's own runtime finds the package inside the pyfunc model, downloaded or local
    package = resolve_model_uri("models:/lm@champion")
    assert set(FILES) | {"model.fp16.onnx", "model.int8.onnx"} <= {p.name for p in package.iterdir()}
    version = mlflow.MlflowClient().get_model_version_by_alias("lm", "champion")
    tags = version.tags  # every variant's parity figures, on the version
    variants = {k.removeprefix(VARIANT_TAG_PREFIX): json.loads(v) for k, v in tags.items() if VARIANT_TAG_PREFIX in k}
    assert set(variants) == {"fp32", "fp16", "int8"} and variants["int8"]["greedy_agreement"] >= 0.9
    assert load_model("models:/lm@champion", device="cpu", variant="int8").variant == "int8"
    assert resolve_model_uri(model_dir) == model_dir / "artifacts" / versions["lm"].name
    assert load_model("models:/lm@champion", device="cpu").generate("wave", 6, temperature=0) == load_model(
        versions["lm"], device="cpu"
    ).generate("wave", 6, temperature=0)

    # MLflow loads it and generates in a fresh process without importing torch
    code = (
        "import sys, mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/lm@champion'); "
        "m.predict(pd.DataFrame({'prompt': ['wave']}), params={'max_new_tokens': 3}); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` on a free loopback port, in its own process group (it starts workers)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # MLflow starts its server as `uvicorn` from PATH: this interpreter's bin first, as in an activated venv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not ready after {SERVE_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


def test_mlflow_models_serve_generates_and_classifies(versions, tmp_path):
    import httpx

    servers = {}
    try:
        for name in ("lm", "clf"):  # both start at once: the wait for them overlaps
            servers[name] = (
                *serve(f"models:/{name}@champion", versions["uri"], tmp_path / f"{name}.log"),
                tmp_path / f"{name}.log",
            )
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        for proc, url, log in servers.values():
            wait_ready(proc, url, log, deadline)
        lm_url, clf_url = servers["lm"][1], servers["clf"][1]

        runtime = load_model(versions["lm"], device="cpu")
        answer = httpx.post(
            f"{lm_url}/invocations",
            timeout=60,
            json={
                "dataframe_records": [{"prompt": p} for p in PROMPTS],
                "params": {"temperature": 0, "max_new_tokens": 10},
            },
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == [{"text": runtime.generate(p, 10, temperature=0)} for p in PROMPTS]
        answer = httpx.post(
            f"{lm_url}/invocations",
            timeout=60,
            json={"inputs": {"prompt": PROMPTS[:1], "max_new_tokens": [4]}, "params": {"seed": 1}},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == [{"text": runtime.generate(PROMPTS[0], 4, seed=1)}]

        missing = httpx.post(f"{lm_url}/invocations", timeout=60, json={"dataframe_records": [{"text": "wave"}]})
        assert missing.status_code == 400 and "missing inputs ['prompt']" in missing.json()["message"]
        bad = httpx.post(
            f"{lm_url}/invocations",
            timeout=60,
            json={"dataframe_records": [{"prompt": "wave"}], "params": {"top_p": 1.5}},
        )
        assert bad.status_code == 400 and "row 0: top_p: must be in (0, 1]" in bad.json()["message"]

        classifier = load_model(versions["clf"], device="cpu")
        answer = httpx.post(
            f"{clf_url}/invocations", timeout=60, json={"dataframe_records": [{"text": t} for t in TEXTS]}
        )
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        probs = classifier.predict_proba(TEXTS)
        assert [p["label"] for p in predictions] == [classifier.labels[k] for k in probs.argmax(axis=1)]
        np.testing.assert_allclose(
            [[p[f"prob_{label}"] for label in classifier.labels] for p in predictions], probs, atol=1e-6
        )
    finally:
        for proc, _, _ in servers.values():
            stop(proc)


def test_mlflow_models_serve_answers_a_chat_request(versions, chat_version, tmp_path):
    import httpx

    log = tmp_path / "chat.log"
    proc, url = serve("models:/chat@champion", versions["uri"], log)
    try:
        wait_ready(proc, url, log, time.monotonic() + SERVE_TIMEOUT_S)
        bot = load_model(chat_version, device="cpu")

        def ask(request: dict) -> httpx.Response:
            return httpx.post(f"{url}/invocations", timeout=60, json=request)

        # the request is the JSON body itself, as OpenAI's; the answer is the completion itself
        answer = ask({"messages": CONVERSATION, "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200, answer.text
        check_completion(answer.json(), expected_completion(bot, CONVERSATION, 8, temperature=0))
        answer = ask({"messages": CONVERSATION[:1], "max_tokens": 5, "seed": 3})  # the seed: a param of the signature
        assert answer.status_code == 200, answer.text
        check_completion(answer.json(), expected_completion(bot, CONVERSATION[:1], 5, seed=3))

        for request, message in [
            ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role: must be one of system, user"),
            ({"messages": [{"role": "user", "content": 5}]}, "key `content`. Expected type string, received type int"),
            ({"messages": CONVERSATION, "temperature": -1.0}, "temperature: must be a finite number >= 0"),
            # MLflow's own check: a float field other than 0 and 1 must be written as a float
            ({"messages": CONVERSATION, "temperature": 2}, "Can not safely convert int64 to float64"),
            ({"messages": CONVERSATION, "n": 2}, "n: this model supports only 1, got 2"),
            ({"dataframe_records": [{"max_tokens": 8}]}, "missing inputs ['messages']"),
        ]:
            refused = ask(request)
            assert refused.status_code == 400 and message in refused.json()["message"], (request, refused.text)
    finally:
        stop(proc)
