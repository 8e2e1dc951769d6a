"""What the OpenAI-compatible endpoints accept and answer: the bodies of /v1/chat/completions and
/v1/completions, bounded by the server's limits, the JSON of their answers and stream chunks, and
their errors, each naming the field it is about (`param`), as OpenAI's clients expect.

The bodies are strict like the rest of the API: an unknown field is refused, and so is every field
OpenAI defines that this server does not implement (tools, logprobs, penalties, ...), unless it is
null or asks for nothing (`presence_penalty: 0`, `logprobs: false`): some clients send those by
default. `user`, and its successors `safety_identifier` and `prompt_cache_key`, change no answer:
they are accepted and ignored. Sampling fields may be null, as OpenAI allows: null is the default.
"""

# No `from __future__ import annotations`: pydantic reads the models' annotations at runtime.

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from gptcore.runtime.serve.limits import ServeLimits
from gptcore.runtime.serve.models import Served
from gptcore.runtime.serve.requests import field_name

# Fields OpenAI defines that this server does not implement, each with the values that ask for
# nothing (null always does); any other value is refused, naming the field.
UNSUPPORTED_IN_BOTH = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
UNSUPPORTED_IN_CHAT = {
    **UNSUPPORTED_IN_BOTH,
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": (),
}
UNSUPPORTED_IN_COMPLETIONS = {**UNSUPPORTED_IN_BOTH, "logprobs": (), "echo": (False,), "best_of": (1,), "suffix": ()}


class RequestRefused(Exception):
    """A request answered with an OpenAI-shaped error: status, message, the field it names, a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad_field(param: str, why: str) -> RequestRefused:
    return RequestRefused(400, f"{param}: {why}", param)


def refused_value(error: ValueError, renamed: dict[str, str] | None = None) -> RequestRefused:
    """A runtime ValueError ("field: why", as `gptcore.runtime` words them) as a 400 naming the field,
    renamed to the request's own word for it (the runtime's max_new_tokens is the request's max_tokens)."""
    param, _, why = str(error).partition(": ")
    param = (renamed or {}).get(param, param)
    return bad_field(param, why)


def refused_body(error: ValidationError) -> RequestRefused:
    """A pydantic ValidationError of a body as a 400 naming the first field at fault (and saying all)."""
    fields = []
    for e in error.errors():
        if e["type"] == "json_invalid":
            fields.append(("body", f"not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}"))
        elif e["type"] == "value_error":  # our validators: the message without pydantic's "Value error, "
            fields.append((field_name(tuple(e["loc"])), str(e["ctx"]["error"])))
        elif e["type"] == "extra_forbidden":
            fields.append((field_name(tuple(e["loc"])), "unknown field"))
        else:
            fields.append((field_name(tuple(e["loc"])), e["msg"]))
    return RequestRefused(400, "; ".join(f"{param}: {why}" for param, why in fields), fields[0][0])


def with_unsupported(base: type[BaseModel], unsupported: dict[str, tuple]) -> type[BaseModel]:
    """`base` plus the OpenAI fields it does not implement, each accepted only as null or a value asking nothing."""

    def asks_for_nothing(cls, value: Any, info) -> Any:
        if value is not None and value not in unsupported[info.field_name]:
            allowed = ", ".join(["null", *(repr(v) for v in unsupported[info.field_name])])
            raise ValueError(f"not supported by this server (accepted: {allowed})")
        return value

    return create_model(
        base.__name__,
        __base__=base,
        __validators__={"asks_for_nothing": field_validator(*unsupported)(asks_for_nothing)},
        **dict.fromkeys(unsupported, (Any, None)),
    )


def openai_request_models(limits: ServeLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The bodies of /v1/chat/completions and /v1/completions, bounded by `limits`; strict: "5" is not 5."""
    strict = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(BaseModel):
        model_config = strict
        include_usage: bool = False

    class Sampled(BaseModel):
        model_config = strict
        model: str = Field(min_length=1)  # a served model's name, its kind, or its URI (ServedModels.find)
        max_tokens: int | None = Field(None, ge=1, le=limits.max_new_tokens)
        temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # null: 1; 0: greedy
        top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
        stop: Any = None  # a string or a list of strings: gptcore.runtime.stop.check_stops says which
        seed: int | None = Field(None, ge=0, lt=2**64)  # choice i of a prompt samples with seed + i
        n: int | None = Field(None, ge=1, le=limits.max_n)
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        user: str | None = None  # these three are ignored: they change no answer
        safety_identifier: str | None = None
        prompt_cache_key: str | None = None

    class ChatCompletionRequest(Sampled):
        # A list of objects; their roles, contents and order are gptcore.runtime.template.parse_messages's rules.
        messages: list[dict[str, Any]]
        max_completion_tokens: int | None = Field(None, ge=1, le=limits.max_new_tokens)

    class CompletionRequest(Sampled):
        prompt: Any  # a string or a list of strings: `prompt_texts` checks it

    return (
        with_unsupported(ChatCompletionRequest, UNSUPPORTED_IN_CHAT),
        with_unsupported(CompletionRequest, UNSUPPORTED_IN_COMPLETIONS),
    )


def parse_body(request_model: type[BaseModel], body: bytes) -> Any:
    try:
        return request_model.model_validate_json(body)
    except ValidationError as e:
        raise refused_body(e) from None


def prompt_texts(prompt: Any, max_prompts: int, max_chars: int) -> list[str]:
    """A completion request's `prompt` as a list of non-empty strings (token-id prompts are not supported)."""
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list) or not 1 <= len(texts) <= max_prompts:
        raise bad_field("prompt", f"a string or a list of 1 to {max_prompts} strings (token ids are not supported)")
    for i, text in enumerate(texts):
        where = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
        if not isinstance(text, str) or not 1 <= len(text) <= max_chars:
            raise bad_field(where, f"must be a string of 1 to {max_chars} characters (token ids are not supported)")
    return texts


def fingerprint(served: Served) -> str | None:
    """`system_fingerprint`: the registered version that answers (None for a package directory)."""
    return f"v{served.version}" if served.version is not None else None


def model_entry(served: Served) -> dict[str, Any]:
    """A served model as /v1/models lists it; `created` is when this server loaded that version."""
    return {
        "id": served.name,
        "object": "model",
        "created": served.loaded_at,
        "owned_by": "gptcore",
        "kind": served.kind,
        "version": served.version,
        "uri": served.uri,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Answer:
    """The envelope that every answer and chunk of one request shares, and its choices' shape: a chat
    completion's (a message; in a stream, deltas) or a text completion's (text)."""

    chat: bool
    served: Served
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        object.__setattr__(self, "id", f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}")

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.served.name,
            "system_fingerprint": fingerprint(self.served),
        }

    def whole(self, texts: list[str], finish_reasons: list[str], tokens: dict[str, int]) -> dict[str, Any]:
        """The non-streamed answer: every choice, and the usage."""
        choices = []
        for index, (text, reason) in enumerate(zip(texts, finish_reasons)):
            said = {"message": {"role": "assistant", "content": text, "refusal": None}} if self.chat else {"text": text}
            choices.append({"index": index, **said, "logprobs": None, "finish_reason": reason})
        return {**self.envelope(chunk=False), "choices": choices, "usage": tokens}

    def chunk(
        self, index: int, text: str | None = None, finish_reason: str | None = None, opening: bool = False
    ) -> dict[str, Any]:
        """One stream chunk of choice `index`: its opening (chat: the role), a piece of text, or its end."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if opening else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        return {**self.envelope(chunk=True), "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, tokens: dict[str, int]) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage` asks for it: no choices, the usage."""
        return {**self.envelope(chunk=True), "choices": [], "usage": tokens}
