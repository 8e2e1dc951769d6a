"""What a request to `gptcore serve` may be: the server's limits, the request bodies they bound,
validation errors as {field, message}, and error answers in the shape each path speaks (OpenAI's on
the OpenAI-compatible paths).
"""

# No `from __future__ import annotations`: FastAPI reads the request models' annotations at runtime.

from typing import Annotated

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gptcore.runtime.serve.limits import ServeLimits

# The paths that answer as OpenAI's API does (`gptcore.runtime.serve.openai_api`), errors included.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
OPENAI_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}
# What a client learns of a failure inside the server (the log has the traceback): no paths, no exception text.
INTERNAL_ERROR = "internal error (the server's log has the details)"
# A top_k past any vocabulary cuts nothing: the bound keeps unbounded integers out of the decode loop.
MAX_TOP_K = 1 << 24


def request_models(limits: ServeLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The two request bodies, bounded by `limits`; strict: "5" is not 5, and unknown fields are errors."""
    strict = ConfigDict(extra="forbid", strict=True)

    class GenerateRequest(BaseModel):
        model_config = strict
        prompt: str = Field(min_length=1, max_length=limits.max_text_chars)
        max_new_tokens: int = Field(min(64, limits.max_new_tokens), ge=1, le=limits.max_new_tokens)
        temperature: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0: greedy
        top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)  # more than any vocabulary: no cut
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
