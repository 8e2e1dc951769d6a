"""OpenAI-compatible endpoints of `gptcore serve`, beside its own, so that OpenAI's clients
(`openai.OpenAI(base_url="http://HOST:PORT/v1", api_key=TOKEN)`) and the tools built on them work:

    POST /v1/chat/completions  the chat model answers `messages` in the chat template it was trained on
    POST /v1/completions       a language model continues `prompt`
    GET  /v1/models            the served models;  GET /v1/models/{model}: one of them

`model` names a served model: its registered name (`gptcore-chat` of `models:/gptcore-chat@champion`),
its package directory's name, its kind ("lm", "chat") or its URI; answers carry its name and, in
`system_fingerprint`, the registered version that made them. /v1/completions continues the prompt
with the model named, the LM or the chat model: on a chat model the prompt is raw text whose
template tokens are read as tokens (a prompt may spell the template itself), whereas a message's
content on /v1/chat/completions is always text. `n` choices are decoded one after another under one
model slot; choice i of a prompt samples with seed + i. Requests go through the same limits and
admission as /v1/generate (400 naming the field, 429 when busy), and errors come in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptcore.runtime.serve.admission import Admission
from gptcore.runtime.serve.limits import ServeLimits
from gptcore.runtime.serve.metrics import ServerMetrics
from gptcore.runtime.serve.models import Served, ServedModels
from gptcore.runtime.serve.openai_schema import (
    Answer,
    RequestRefused,
    bad_field,
    model_entry,
    openai_request_models,
    parse_body,
    prompt_texts,
    refused_value,
    usage,
)
from gptcore.runtime.serve.requests import INTERNAL_ERROR, openai_error
from gptcore.runtime.stop import Decoded, check_stops, decoded_text

log = logging.getLogger("gptcore.serve")

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
MESSAGE_FIELDS = ("role", "content")
WHAT = {"lm": "language model", "chat": "chat model", "classifier": "classifier"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Sampling:
    """How a request's choices are decoded, its fields resolved to their defaults."""

    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    n: int
    stops: list[str]
    stream: bool
    include_usage: bool


def choice_pieces(job: Job, prompt_ids: list[int], seed: int | None, decoded: Decoded) -> Iterator[str]:
    """One choice of a job, piece by piece; `decoded` counts it and says how it ended."""
    s = job.sampling
    return decoded_text(
        job.served.generator, prompt_ids, s.max_tokens, s.temperature, None, s.top_p, seed, s.stops, decoded
    )


@dataclass(frozen=True)
class Job:
    """What to decode for one request: the model, each choice's (index, prompt ids, seed), the sampling."""

    served: Served
    choices: list[tuple[int, list[int], int | None]]
    prompt_tokens: int
    sampling: Sampling


def add_openai_api(
    app: FastAPI,
    models: ServedModels,
    admission: Admission,
    metrics: ServerMetrics,
    limits: ServeLimits,
    load_state: dict[str, Any],
) -> None:
    """Add the OpenAI-compatible routes to `app`, on its models, admission and metrics."""
    ChatCompletionRequest, CompletionRequest = openai_request_models(limits)

    @app.exception_handler(RequestRefused)
    async def refused(request, exc: RequestRefused) -> JSONResponse:
        return openai_error(exc.status, exc.message, exc.param, exc.code)

    def ready() -> None:
        if not load_state["ready"]:
            why = load_state["error"]
            message = "the models are still loading" if why is None else f"the models failed to load: {why}"
            raise RequestRefused(503, message, code="model_not_ready")

    def named(name: str, kinds: tuple[str, ...], path: str) -> Served:
        """The served model `name` calls, of one of `kinds`; 404 in OpenAI's shape otherwise."""
        ready()
        served = models.find(name)
        serving = ", ".join(f"{s.name} ({s.kind})" for s in models.by_kind.values())
        if served is None:
            raise RequestRefused(
                404, f"model {name!r} is not served here (serving: {serving})", "model", "model_not_found"
            )
        if served.kind not in kinds:
            raise RequestRefused(
                404,
                f"model {name!r} is a {WHAT[served.kind]}; {path} needs a "
                f"{' or a '.join(WHAT[k] for k in kinds)} (serving: {serving})",
                "model",
            )
        return served

    def sampling_of(body, default_max_tokens: int) -> tuple[Sampling, str]:
        """The request's sampling, checked, and the field that set max_tokens (for errors about it)."""
        if body.stream_options is not None and not body.stream:
            raise bad_field("stream_options", "only allowed when stream is true")
        max_tokens, tokens_field = body.max_tokens, "max_tokens"
        if getattr(body, "max_completion_tokens", None) is not None:
            if max_tokens is not None:
                raise bad_field("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
            max_tokens, tokens_field = body.max_completion_tokens, "max_completion_tokens"
        try:
            stops = check_stops(body.stop)
        except ValueError as e:
            raise refused_value(e) from None
        sampling = Sampling(
            max_tokens=max_tokens or min(default_max_tokens, limits.max_new_tokens),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            n=body.n or 1,
            stops=stops,
            stream=bool(body.stream),
            include_usage=body.stream_options is not None and body.stream_options.include_usage,
        )
        return sampling, tokens_field

    def seed_of(sampling: Sampling, choice: int) -> int | None:
        return None if sampling.seed is None else sampling.seed + choice

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await request.body())
        served = named(body.model, ("chat",), CHAT_PATH)
        # Half the context by default: room for the conversation, and an answer it does not cut short.
        sampling, tokens_field = sampling_of(body, served.model.block_size // 2)
        chars = sum(len(m["content"]) for m in body.messages if isinstance(m.get("content"), str))
        if chars > limits.max_text_chars:
            raise bad_field(
                "messages", f"{chars} characters in all; at most {limits.max_text_chars} (--max-prompt-tokens × 16)"
            )
        try:
            prompt_ids, _ = served.model.prompt(body.messages, sampling.max_tokens)
        except ValueError as e:  # "messages[2].role: ...", "max_new_tokens: ...": the field comes first
            raise refused_value(e, {"max_new_tokens": tokens_field}) from None
        for i, message in enumerate(body.messages):
            if extra := sorted(message.keys() - set(MESSAGE_FIELDS)):
                raise bad_field(f"messages[{i}].{extra[0]}", "not supported here (a message has role and content)")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise bad_field(
                "messages",
                f"the conversation as kept takes {len(prompt_ids)} tokens; at most {limits.max_prompt_tokens} "
                "(--max-prompt-tokens)",
            )
        choices = [(i, prompt_ids, seed_of(sampling, i)) for i in range(sampling.n)]
        job = Job(served, choices, len(prompt_ids), sampling)
        return await answer(Answer(chat=True, served=served), job, CHAT_PATH)

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionRequest, await request.body())
        served = named(body.model, ("lm", "chat"), COMPLETIONS_PATH)
        sampling, _ = sampling_of(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
        texts = prompt_texts(body.prompt, limits.max_n, limits.max_text_chars)
        if len(texts) * sampling.n > limits.max_n:
            raise bad_field("n", f"{len(texts)} prompts of n={sampling.n} choices: at most {limits.max_n} (--max-n)")
        prompts = []
        for i, text in enumerate(texts):
            ids = served.model.encode(text)
            if len(ids) > limits.max_prompt_tokens:
                where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
                raise bad_field(where, f"{len(ids)} tokens; at most {limits.max_prompt_tokens} (--max-prompt-tokens)")
            prompts.append(ids)
        choices = [
            (p * sampling.n + i, ids, seed_of(sampling, i)) for p, ids in enumerate(prompts) for i in range(sampling.n)
        ]
        job = Job(served, choices, sum(len(ids) for ids in prompts), sampling)
        return await answer(Answer(chat=False, served=served), job, COMPLETIONS_PATH)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        ready()
        return {"object": "list", "data": [model_entry(s) for s in models.by_kind.values()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str) -> dict[str, Any]:
        return model_entry(named(name, tuple(WHAT), "/v1/models"))

    async def answer(shape: Answer, job: Job, path: str) -> Response:
        """Decode the job's choices on a model thread, under a slot: the whole answer, or its stream."""
        await admission.acquire()
        if job.sampling.stream:
            return StreamingResponse(
                stream(shape, job, path), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        def decode_all() -> tuple[list[str], list[Decoded]]:
            texts, outcomes = [], []
            for _, prompt_ids, seed in job.choices:
                decoded = Decoded()
                texts.append("".join(choice_pieces(job, prompt_ids, seed, decoded)))
                outcomes.append(decoded)
            return texts, outcomes

        texts, outcomes = await asyncio.wrap_future(admission.start(decode_all))
        completion_tokens = sum(d.tokens for d in outcomes)
        metrics.tokens.inc(completion_tokens)
        tokens = usage(job.prompt_tokens, completion_tokens)
        return JSONResponse(shape.whole(texts, [d.finish_reason for d in outcomes], tokens))

    def stream(shape: Answer, job: Job, path: str) -> AsyncIterator[str]:
        """Decode on a model thread (under the slot the caller took) and relay its pieces as OpenAI's chunks.

        The thread holds the slot until it ends; it stops early when the client goes away.
        """
        loop, events, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        emit = partial(loop.call_soon_threadsafe, events.put_nowait)  # at most n * (max_tokens + 2) events

        def produce() -> None:
            outcomes: list[Decoded] = []
            try:
                for index, prompt_ids, seed in job.choices:
                    outcomes.append(decoded := Decoded())
                    emit(("open", index, None))
                    for piece in choice_pieces(job, prompt_ids, seed, decoded):
                        if gone.is_set():
                            return
                        emit(("piece", index, piece))
                    emit(("end", index, decoded))
                emit(("done", None, None))
            except Exception:
                log.exception("serve: streamed completion failed")
                emit(("error", None, INTERNAL_ERROR))
            finally:
                metrics.tokens.inc(sum(d.tokens for d in outcomes))

        admission.start(produce)

        async def relay() -> AsyncIterator[str]:
            completion_tokens = 0
            try:
                while True:
                    kind, index, value = await events.get()
                    if kind == "open":
                        if shape.chat:  # a chat choice opens with its role; a text choice has none
                            yield sse(shape.chunk(index, opening=True))
                    elif kind == "piece":
                        yield sse(shape.chunk(index, text=value))
                    elif kind == "end":
                        completion_tokens += value.tokens
                        yield sse(shape.chunk(index, finish_reason=value.finish_reason))
                    elif kind == "error":
                        metrics.errors.labels(path).inc()
                        yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                        return
                    else:
                        if job.sampling.include_usage:
                            yield sse(shape.usage_chunk(usage(job.prompt_tokens, completion_tokens)))
                        yield "data: [DONE]\n\n"
                        return
            finally:
                gone.set()

        return relay()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
