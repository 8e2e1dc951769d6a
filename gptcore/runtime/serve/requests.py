"""What a request to `gptcore serve` may be: the server's limits, the request bodies they bound,
validation errors as {field, message}, error answers in the shape each path speaks (OpenAI's on the
OpenAI-compatible paths), and the bearer-token check that runs before a body is read.
"""

# No `from __future__ import annotations`: FastAPI reads the request models' annotations at runtime.

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gptcore.errors import ConfigError
from gptcore.runtime.lm import MAX_BATCH, MAX_NEW_TOKENS

# A prompt or text may hold this many characters per allowed token: a cap on what a request can
# make the server tokenize, ahead of the exact token count.
CHARS_PER_TOKEN = 16
# JSON can spell one character in up to 12 bytes (an escaped surrogate pair), plus the envelope.
BODY_BYTES_PER_CHAR, BODY_OVERHEAD = 12, 64 * 1024
MAX_N = 64
MODEL_KINDS = ("lm", "chat", "classifier")  # a server serves at most one model of each

# The paths that answer as OpenAI's API does (`gptcore.runtime.serve.openai_api`), errors included.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
OPENAI_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}


@dataclass(frozen=True)
class ServeLimits:
    max_concurrency: int = 4
    max_queue: int = 32
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_batch: int = 32
    max_n: int = 8  # choices per OpenAI-style request, decoded one after another under one slot
    max_running: int = 32  # sequences each engine decodes in one batch (--batching continuous)
    kv_tokens: int = 32768  # cache slots (rows x width) each engine's running sequences may reserve

    def __post_init__(self):
        bounds = {
            "max_running": (1, 1024),
            "kv_tokens": (1, 1 << 24),
            "max_concurrency": (1, 256),
            "max_queue": (0, 10_000),
            "max_prompt_tokens": (1, 16_384),
            "max_new_tokens": (1, MAX_NEW_TOKENS),
            "max_batch": (1, MAX_BATCH),
            "max_n": (1, MAX_N),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"--{name.replace('_', '-')}: must be in [{low}, {high}], got {value}")

    @property
    def max_text_chars(self) -> int:
        return self.max_prompt_tokens * CHARS_PER_TOKEN

    @property
    def max_body_bytes(self) -> int:
        return self.max_batch * self.max_text_chars * BODY_BYTES_PER_CHAR + BODY_OVERHEAD


BATCHING = ("continuous", "per-request")


@dataclass(frozen=True)
class ServeConfig:
    models: list[str]
    limits: ServeLimits = field(default_factory=ServeLimits)
    batching: str = "continuous"  # an engine per generative model, or each request decoding alone on a thread
    device: str = "auto"
    threads: int | None = None
    variant: str = "auto"
    reload_interval: float = 30.0  # seconds between registry polls for models:/NAME@ALIAS; 0: never
    tracking_uri: str | None = None
    registry_uri: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.models) <= len(MODEL_KINDS):
            raise ConfigError(
                f"--model: give one to {len(MODEL_KINDS)} (at most one language model, one chat model and "
                f"one classifier), got {len(self.models)}"
            )
        if self.batching not in BATCHING:
            raise ConfigError(f"--batching: must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.reload_interval < 0:
            raise ConfigError(f"--reload-interval: must be >= 0 seconds, got {self.reload_interval}")


def request_models(limits: ServeLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The two request bodies, bounded by `limits`; strict: "5" is not 5, and unknown fields are errors."""
    strict = ConfigDict(extra="forbid", strict=True)

    class GenerateRequest(BaseModel):
        model_config = strict
        prompt: str = Field(min_length=1, max_length=limits.max_text_chars)
        max_new_tokens: int = Field(min(64, limits.max_new_tokens), ge=1, le=limits.max_new_tokens)
        temperature: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0: greedy
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = Field(None, ge=0, lt=2**64)
        stream: bool = False

    class ClassifyRequest(BaseModel):
        model_config = strict
        texts: list[Annotated[str, StringConstraints(max_length=limits.max_text_chars)]] = Field(
            min_length=1, max_length=limits.max_batch
        )

    return GenerateRequest, ClassifyRequest


def field_error(error: dict) -> dict[str, str]:
    """One pydantic/FastAPI validation error as {field, message}."""
    if error["type"] == "json_invalid":  # its loc ends with the character offset, not a field
        reason = error.get("ctx", {}).get("error", error["msg"])
        return {"field": "body", "message": f"not valid JSON at character {error['loc'][-1]}: {reason}"}
    return {"field": field_name(tuple(error["loc"])), "message": error["msg"]}


def field_name(loc: tuple) -> str:
    """('body', 'texts', 3) -> 'texts[3]'; the body itself -> 'body'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else f"{'.' if name else ''}{part}"
    return name or "body"


def speaks_openai(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    """An error in OpenAI's shape, {"error": {message, type, param, code}}, which OpenAI's clients read."""
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def refusal(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An error answer in the shape `path` speaks: OpenAI's on the OpenAI paths, {"error": message} elsewhere."""
    if speaks_openai(path):
        return openai_error(status, message, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def invalid(fields: list[dict[str, str]]) -> JSONResponse:
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return JSONResponse({"error": f"invalid request: {detail}", "fields": fields}, status_code=422)


class BearerAuth:
    """ASGI middleware: /v1/* and /metrics need `Authorization: Bearer <token>`, checked before the body is read."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if (
            self.token is not None
            and scope["type"] == "http"
            and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics")
        ):
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                answer = refusal(
                    scope["path"],
                    401,
                    "missing or wrong bearer token: send Authorization: Bearer <token>",
                    {"WWW-Authenticate": "Bearer"},
                )
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)
