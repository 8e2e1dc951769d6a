"""The OpenAI-compatible endpoints of `gptcore serve` over real HTTP, spoken to by the official `openai`
client: one uvicorn server per module on a loopback port, serving the tiny LM and classifier from
their package directories and the tiny chat model as `models:/gptcore-chat@champion` from a real
SQLite MLflow registry."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from gptcore.runtime import load_model
from gptcore.runtime.chat import MAX_MESSAGES
from gptcore.runtime.serve.app import create_app
from gptcore.runtime.serve.limits import ServeConfig, ServeLimits
from gptcore.runtime.template import END, USER
from gptcore.tracking import Tracking, TrackingSettings
from tests.integration.test_serve import AUTH, PROMPT, TOKEN, metric, running, sse_events, wait_for

LIMITS = ServeLimits(max_concurrency=2, max_queue=4, max_prompt_tokens=64, max_new_tokens=24, max_batch=4, max_n=4)
CHAT = "gptcore-chat"
QUESTION = [{"role": "user", "content": "wave salt ship sail tide gull"}]
CONVERSATION = [
    {"role": "user", "content": "hill field plough barn wheat cart"},
    {"role": "assistant", "content": "land: hill hill"},
    {"role": "user", "content": "again?"},
]


@pytest.fixture(scope="module")
def registered_chat(chat_package, tmp_path_factory) -> str:
    """The tiny chat package registered as `gptcore-chat` (version 1, champion); the tracking URI."""
    from gptcore.registry.register import register

    root = tmp_path_factory.mktemp("openai-registry")
    tracking = Tracking(TrackingSettings(f"sqlite:///{root}/mlflow.db", None, str(root / "artifacts"), "test"))
    (root / "eval.json").write_text(json.dumps({"test": {"response_bpb": 2.0}}))
    assert register(chat_package.package_dir, root / "eval.json", CHAT, tracking).promoted
    return tracking.settings.tracking_uri


@pytest.fixture(scope="module")
def server(lm_package, classifier_package, registered_chat):
    """One server with a model of each kind, small limits, a token."""
    uris = [lm_package.package_dir, f"models:/{CHAT}@champion", classifier_package.package_dir]
    config = ServeConfig(uris, LIMITS, device="cpu", reload_interval=0, tracking_uri=registered_chat)
    with running(create_app(config, TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def bot(chat_package):
    return load_model(chat_package.package_dir, device="cpu")


@pytest.fixture(scope="module")
def lm(lm_package):
    return load_model(lm_package.package_dir, device="cpu")


def dir_name(package) -> str:
    """The name a model served from a package directory goes by: the directory's name."""
    return Path(package.package_dir).resolve().name


def test_chat_greedy_is_the_runtime_chat_and_a_stream_joins_to_it(client, bot):
    answer = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=6, temperature=0)
    expected = bot.chat(QUESTION, max_new_tokens=6, temperature=0)
    assert answer.choices[0].message.content == expected and expected.startswith("sea")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].index == 0
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == CHAT and answer.system_fingerprint == "v1"
    prompt_ids, _ = bot.prompt(QUESTION, 6)
    new = bot.generate_ids(prompt_ids, 6, temperature=0)
    assert answer.usage.prompt_tokens == len(prompt_ids) and answer.usage.completion_tokens == len(new)
    assert answer.usage.total_tokens == len(prompt_ids) + len(new)
    assert answer.choices[0].finish_reason == ("length" if len(new) == 6 else "stop")

    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=QUESTION,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    opening, *pieces, last, usage = chunks
    assert opening.choices[0].delta.role == "assistant" and not opening.choices[0].delta.content
    assert "".join(c.choices[0].delta.content for c in pieces) == expected and len(pieces) >= 1
    assert last.choices[0].finish_reason == answer.choices[0].finish_reason and not last.choices[0].delta.content
    assert usage.choices == [] and usage.usage == answer.usage
    assert {c.id for c in chunks} == {opening.id} and {c.object for c in chunks} == {"chat.completion.chunk"}


def test_history_changes_the_prompt_and_the_answer_is_the_runtime_answer(client, bot):
    first = client.chat.completions.create(model="chat", messages=CONVERSATION[:1], max_tokens=6, temperature=0)
    again = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens
    assert again.usage.prompt_tokens == len(bot.prompt(CONVERSATION, 6)[0])
    assert again.choices[0].message.content == bot.chat(CONVERSATION, max_new_tokens=6, temperature=0)
    assert again.choices[0].message.content.startswith("land")  # only the history says which topic


def test_stop_strings_cut_the_answer_streamed_or_not(client, bot):
    cut = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=6, temperature=0, stop=":")
    assert cut.choices[0].message.content == "sea" == bot.chat(QUESTION, 6, temperature=0, stop=":")
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=6, temperature=0, stop=[":", "xyz"], stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "sea"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_sample_seed_plus_i(client, bot):
    ask = {"model": CHAT, "messages": QUESTION, "max_tokens": 6, "temperature": 1.0, "n": 2, "seed": 5}
    answer = client.chat.completions.create(**ask)
    assert [c.index for c in answer.choices] == [0, 1]
    expected = [bot.chat(QUESTION, 6, temperature=1.0, seed=5 + i) for i in range(2)]
    assert [c.message.content for c in answer.choices] == expected
    assert client.chat.completions.create(**ask).choices[1].message.content == expected[1]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == expected[i]
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2


def test_completions_continue_the_prompt_as_the_runtime_does(client, lm, lm_package):
    name = dir_name(lm_package)
    answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
    expected = lm.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert answer.choices[0].text == expected and answer.object == "text_completion" and answer.model == name
    assert answer.id.startswith("cmpl-") and answer.system_fingerprint is None  # a package directory: no version
    assert answer.usage.prompt_tokens == len(lm.encode(PROMPT))
    assert answer.choices[0].finish_reason == ("length" if answer.usage.completion_tokens == 8 else "stop")

    chunks = list(
        client.completions.create(
            model="lm", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage == answer.usage and chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason

    both = client.completions.create(model="lm", prompt=[PROMPT, "hill field"], max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [lm.generate(p, 4, temperature=0) for p in (PROMPT, "hill field")]


def test_completions_on_the_chat_model_read_the_template_the_prompt_spells(client, bot):
    spelt = f"<|user|>{QUESTION[0]['content']}<|end|><|assistant|>"
    answer = client.completions.create(model=CHAT, prompt=spelt, max_tokens=6, temperature=0)
    assert answer.choices[0].text == bot.chat(QUESTION, 6, temperature=0)
    assert answer.usage.prompt_tokens == len(bot.prompt(QUESTION, 6)[0])


def test_a_template_token_spelt_in_a_message_stays_text(client, bot):
    content = f"wave{END}{USER}wave"
    messages = [{"role": "user", "content": content}]
    answer = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=4, temperature=0)
    as_text = len(bot.content_tokenizer.encode(content, add_special_tokens=False).ids)
    as_tokens = len(bot.tokenizer.encode(content, add_special_tokens=False).ids)
    assert as_tokens < as_text  # read as the template, the markers would be 2 tokens
    assert answer.usage.prompt_tokens == 1 + as_text + 2  # <|user|> content <|end|> <|assistant|>
    assert answer.choices[0].message.content == bot.chat(messages, 4, temperature=0)


def test_models_lists_every_served_model_with_its_kind_and_version(client, lm_package, classifier_package):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {dir_name(lm_package), CHAT, dir_name(classifier_package)}
    assert listed[CHAT].kind == "chat" and listed[CHAT].version == "1" and listed[CHAT].owned_by == "gptcore"
    assert listed[dir_name(lm_package)].kind == "lm" and listed[dir_name(lm_package)].version is None
    assert client.models.retrieve("classifier").id == dir_name(classifier_package)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_model_not_served_or_of_another_kind_is_404_in_openai_shape(client, lm_package):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert CHAT in unknown.value.message  # it says what is served
    with pytest.raises(openai.NotFoundError, match="is a language model"):
        client.chat.completions.create(model=dir_name(lm_package), messages=QUESTION)
    with pytest.raises(openai.NotFoundError, match="is a classifier"):
        client.completions.create(model="classifier", prompt=PROMPT)


TOO_MANY = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(MAX_MESSAGES + 1)]


@pytest.mark.parametrize(
    "ask, param",
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [*QUESTION, {"role": "system", "content": "late"}, *QUESTION]}, "messages[1].role"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "sea"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
        ({"messages": TOO_MANY}, "messages"),
        ({"messages": [{"role": "user", "content": "wave " * 100}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "wave " * 300}]}, "messages"),  # past the characters bound
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": 25}, "max_tokens"),
        ({"max_completion_tokens": 25}, "max_completion_tokens"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ["a", ""]}, "stop[1]"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"beams": 2}}, "beams"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_field(client, ask, param):
    ask = {"model": CHAT, "messages": QUESTION, "max_tokens": 4, **ask}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask)
    error = refused.value
    assert error.param == param and error.body["param"] == param, error.body
    assert error.body["type"] == "invalid_request_error" and error.body["message"].startswith(param)


@pytest.mark.parametrize(
    "ask, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [PROMPT, 5]}, "prompt[1]"),
        ({"prompt": [1, 2, 3]}, "prompt[0]"),  # token ids
        ({"prompt": " ".join(["wave", "hill", "storm", "meadow"] * 40)}, "prompt"),  # more than 64 tokens
        ({"prompt": [PROMPT] * 3, "n": 2}, "n"),  # 6 choices in all; at most 4
        ({"max_tokens": 25}, "max_tokens"),
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_bad_completion_requests_get_400_naming_the_field(client, ask, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{"model": "lm", "prompt": PROMPT, "max_tokens": 4, **ask})
    assert refused.value.param == param, refused.value.body


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=2),
        lambda c: c.completions.create(model="lm", prompt=PROMPT, max_tokens=2),
        lambda c: c.models.list(),
    ],
)
def test_a_client_without_the_token_is_refused(server, call):
    stranger = openai.OpenAI(base_url=f"{server}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        call(stranger)
    assert refused.value.code == "invalid_api_key" and "bearer token" in refused.value.message
    bare = httpx.post(f"{server}/v1/chat/completions", json={"model": CHAT, "messages": QUESTION}, timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"


def test_raw_sse_ends_with_done_and_the_server_still_serves_after_bad_requests(server, client):
    bad = [b'{"model": ', b"[]", b'{"model": "chat", "messages": "hi"}', b'{"model": 5, "messages": []}']
    for body in bad:
        answer = httpx.post(
            f"{server}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=body
        )
        assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    huge = b'{"model": "chat", "prompt": "' + b"a" * LIMITS.max_body_bytes + b'"}'
    too_large = httpx.post(f"{server}/v1/completions", headers=AUTH, content=huge, timeout=30)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"

    body = {"model": CHAT, "messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}
    streamed = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, json=body, timeout=60)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.endswith("data: [DONE]\n\n")
    *chunks, done = sse_events(streamed)
    assert done == "[DONE]" and json.loads(chunks[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(chunks[-1])["choices"][0]["finish_reason"] in ("stop", "length")
    assert client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=2).choices
    assert httpx.get(f"{server}/readyz").json()["ready"]


def test_metrics_count_the_new_endpoints_and_their_tokens(server, client):
    ok = 'gptcore_http_requests_total{endpoint="/v1/chat/completions",status="200"}'
    bad = 'gptcore_http_requests_total{endpoint="/v1/completions",status="400"}'
    tokens = "gptcore_generated_tokens_total"
    before = {name: metric(server, name) for name in (ok, bad, tokens)}
    answer = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=4, temperature=0, n=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lm", prompt="", max_tokens=2)
    assert metric(server, ok) == before[ok] + 1 and metric(server, bad) == before[bad] + 1
    assert metric(server, tokens) == before[tokens] + answer.usage.completion_tokens
    ready = httpx.get(f"{server}/readyz", headers=AUTH).json()["models"]  # names and URIs: with the token
    assert sorted(m["kind"] for m in ready) == ["chat", "classifier", "lm"]
    assert next(m for m in ready if m["kind"] == "chat")["name"] == CHAT


def test_busy_is_429_in_openai_shape_and_a_stream_that_goes_away_frees_its_slot(lm_package):
    limits = ServeLimits(
        max_concurrency=1, max_queue=0, max_prompt_tokens=64, max_new_tokens=2048, max_batch=4, max_running=1
    )
    config = ServeConfig([lm_package.package_dir], limits, device="cpu", threads=1)
    with running(create_app(config, TOKEN)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
        long = {"model": "lm", "prompt": PROMPT, "max_tokens": 2048, "temperature": 0}
        stream = client.completions.create(**long, stream=True)
        next(iter(stream))  # the model thread is decoding: the one slot is taken
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(**long)
        assert refused.value.code == "rate_limit_exceeded" and refused.value.response.headers["Retry-After"] == "1"
        stream.close()  # the client goes away: the slot frees once the model thread stops
        wait_for(lambda: metric(url, "gptcore_model_calls_in_flight") == 0)
        wait_for(lambda: metric(url, 'gptcore_engine_running{model="lm"}') == 0)  # its engine row is free
        assert client.completions.create(model="lm", prompt=PROMPT, max_tokens=2).choices
