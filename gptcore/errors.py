"""Errors a user can act on, each message naming the file, record or field and what is wrong, and the
checks that raise them for a config field (`pretrain.lr: must be > 0, got 0`)."""

from __future__ import annotations

from typing import Any


class GptcoreError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(GptcoreError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class InputError(GptcoreError, ValueError):
    """Input data (a corpus file, a record, a label column) cannot be used."""


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
