"""Errors a user can act on, each message naming the file, record or field and what is wrong, and the
checks that raise them for a config field (`pretrain.lr: must be > 0, got 0`), and `redact`: the one
way a URI or a message that may quote credentials is shown or recorded."""

from __future__ import annotations

import os
import re
from typing import Any


class GptcoreError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(GptcoreError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class InputError(GptcoreError, ValueError):
    """Input data (a corpus file, a record, a label column) cannot be used."""


class DiskFullError(GptcoreError, OSError):
    """An output could not be written for want of space (or quota); the previous one is unchanged."""


class ParityError(GptcoreError):
    """An exported ONNX model does not reproduce the PyTorch model."""


def check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def check_positive(obj: Any, *names: str, unset_ok: bool = False) -> None:
    """Each field > 0 (or None, with `unset_ok`)."""
    for name in names:
        value = getattr(obj, name)
        check((unset_ok and value is None) or value > 0, name, f"must be > 0, got {value!r}")


def check_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value >= 0, name, f"must be >= 0, got {value!r}")


def check_one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    check(value in allowed, name, f"must be one of {', '.join(allowed)}, got {value!r}")


def check_within(obj: Any, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """`name` in the interval from low to high, each end closed unless said open."""
    value = getattr(obj, name)
    ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    check(ok, name, f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value!r}")


_ADDRESS = re.compile(r"(?:(?:tcp|tls)://)?[A-Za-z0-9.\[\]:_-]+:\d{1,5}")


def check_address(obj: Any, name: str) -> None:
    """Unset, or a network address `[tcp://|tls://]host:port` (a Dask scheduler's)."""
    value = getattr(obj, name)
    check(
        value is None or bool(_ADDRESS.fullmatch(str(value))),
        name,
        f"must be a scheduler address like tcp://host:8786, got {value!r}",
    )


REDACTED = "***"
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_SECRET_PARAM = re.compile(r"([?&;][^=&#\s]*(?:token|secret|pass|pwd|key|sig|credential|auth)[^=&#\s]*=)[^&#\s]*", re.I)
_SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|AUTH_STRING|CREDENTIAL")
_MIN_SECRET_CHARS = 8  # shorter values of such variables (a flag, "admin") would redact ordinary words


def redact(text: str) -> str:
    """`text` with the credentials in it replaced by `***`, for logs, MLflow and files.

    In every URI: the password of `scheme://user:password@host` (the user stays: it says who) and
    a user-only userinfo (often a token: `https://TOKEN@host`); anywhere, the values of query
    parameters named like secrets (`token`, `key`, `password`, `signature`, `X-Amz-Credential`...,
    after `?`, `&` or `;`). Then the
    values of environment variables named like secrets (`MLFLOW_TRACKING_PASSWORD`,
    `AWS_SECRET_ACCESS_KEY`...), wherever they appear, as an error message may quote them.
    """
    text = _URI.sub(_redact_uri, text)
    # a URL's path and query without its scheme, as urllib3 quotes it ("url: /?token=...")
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    for name, value in os.environ.items():
        if len(value) >= _MIN_SECRET_CHARS and _SECRET_ENV.search(name.upper()):
            text = text.replace(value, REDACTED)
    return text


def _redact_uri(match: re.Match) -> str:
    uri = match.group(0)
    scheme, _, rest = uri.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    return f"{scheme}://{authority}{tail}"
