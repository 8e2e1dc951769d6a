"""What `gptcore serve` may be configured with: its limits, its config, and the command-line flags
that set them (light: the CLI imports this for every verb; the server's own modules load only
when it serves)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from gptcore.errors import ConfigError
from gptcore.runtime.lm import MAX_BATCH, MAX_NEW_TOKENS

# A prompt or text may hold this many characters per allowed token: a cap on what a request can
# make the server tokenize, ahead of the exact token count.
CHARS_PER_TOKEN = 16
# JSON can spell one character in up to 12 bytes (an escaped surrogate pair), plus the envelope.
BODY_BYTES_PER_CHAR, BODY_OVERHEAD = 12, 64 * 1024
MAX_N = 64
MODEL_KINDS = ("lm", "chat", "classifier")  # a server serves at most one model of each


@dataclass(frozen=True)
class ServeLimits:
    """What the server bounds; LIMIT_HELP says what each field bounds (its flag's help)."""

    max_concurrency: int = 4
    max_queue: int = 32
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_batch: int = 32
    max_n: int = 8
    max_running: int = 32
    kv_tokens: int = 32768
    request_timeout: int = 10
    write_timeout: int = 30
    max_connections: int = 1000

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
            "request_timeout": (1, 3600),
            "write_timeout": (1, 3600),
            "max_connections": (16, 1_000_000),
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


LIMIT_HELP = {  # what each of ServeLimits' fields bounds, for its flag
    "max_concurrency": "model calls running at once (per-request generation, classification)",
    "max_queue": "requests waiting for a model call or an engine row; beyond: 429",
    "max_prompt_tokens": "tokens of a prompt or a conversation as kept",
    "max_new_tokens": "tokens a request may ask for",
    "max_batch": "texts per /v1/classify request",
    "max_n": "choices per /v1/chat/completions or /v1/completions request, decoded one after another",
    "max_running": "sequences an engine decodes in one batch",
    "kv_tokens": "cache slots (rows x width) an engine's running sequences may reserve",
    "request_timeout": "seconds a connection has to send a whole request (headers and body) once it may; "
    "then it is closed",
    "write_timeout": "seconds an answer may wait for a client that reads nothing (a stalled stream); "
    "then the connection is dropped and its generation stopped",
    "max_connections": "connections open at once; one more closes the one idle longest (keep under ulimit -n)",
}


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="models:/NAME@ALIAS (followed as the alias moves), models:/NAME/VERSION or a package directory; "
        "repeat for an LM, a chat model and a classifier (at most one of each)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind; beyond loopback only with a token (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--batching",
        choices=["continuous", "per-request"],
        default="continuous",
        help="continuous: an engine per LM and chat model decodes every request in one batch; per-request: "
        "each request decodes alone on a model thread, as before the engine (default: %(default)s)",
    )
    for limit in fields(ServeLimits):
        flag, what = f"--{limit.name.replace('_', '-')}", LIMIT_HELP[limit.name]
        p.add_argument(flag, type=int, default=limit.default, help=f"{what} (default: %(default)s)")
    p.add_argument(
        "--reload-interval",
        type=float,
        default=30.0,
        help="seconds between registry polls of a models:/NAME@ALIAS model; 0: never reload (default: %(default)s)",
    )


def serve_config(args: Any, tracking_uri: str | None, registry_uri: str | None) -> ServeConfig:
    """The ServeConfig of parsed `gptcore serve` flags (runtime_flags' device, threads, variant included)."""
    limits = ServeLimits(**{limit.name: getattr(args, limit.name) for limit in fields(ServeLimits)})
    return ServeConfig(
        args.model,
        limits,
        args.batching,
        args.device,
        args.threads,
        args.variant,
        args.reload_interval,
        tracking_uri,
        registry_uri,
    )
