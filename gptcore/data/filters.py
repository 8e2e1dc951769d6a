"""Cleaning and filtering of documents, each step configurable and counted.

`Cleaner(cfg)(text, metadata)` returns the cleaned text, or None for a document to drop; what
each step did is added to `Cleaner.counts` (documents dropped per reason, PII replaced per
kind, control characters removed), and the ingest manifest and MLflow run report those counts.

Steps, in order: Unicode NFC and `\\n` line endings; control characters removed (tab and
newline kept); PII (e-mail addresses, IP addresses, phone numbers) replaced by placeholders;
document length in bytes within [min_document_bytes, max_document_bytes]; then the user's
predicates (`module:function`, called with text and metadata, False drops the document).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

from gptcore.config import IngestConfig
from gptcore.errors import ConfigError

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # \r is gone by then; \t and \n stay
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
# An optional country code, then 2-4 + 3-4 + 3-4 digits in groups: (020) 7946 0958, 555-123-4567.
# Dates (2024-11-23) and years have too few digits in their groups to match.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\w)")
# Where a phone number or IP address could be: 8+ characters of digits and separators. One
# scan of the text for these, then the exact patterns only around them (with the characters
# their look-arounds need): an order of magnitude faster than running the patterns over it all.
_CANDIDATE = re.compile(r"\d[\d().+ -]{6,}\d")

Predicate = Callable[[str, dict[str, Any]], bool]


def normalise(text: str) -> str:
    """Unicode NFC and `\\n` line endings, so equal texts compare and tokenize equal."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def redact_pii(text: str, counts: Counter) -> str:
    """E-mail addresses, IPv4 addresses and phone numbers replaced by placeholders, counted by kind.

    The e-mail pattern runs only on texts with an `@`, the number patterns only around runs of
    digits and separators.
    """
    if "@" in text:
        text, n = _EMAIL.subn(PLACEHOLDERS["email"], text)
        counts["pii_email"] += n
    parts, last = [], 0
    for m in _CANDIDATE.finditer(text):
        start, end = max(last, m.start() - 2), min(len(text), m.end() + 2)
        window, n_ip = _IP.subn(PLACEHOLDERS["ip"], text[start:end])
        window, n_phone = _PHONE.subn(PLACEHOLDERS["phone"], window)
        if n_ip or n_phone:
            parts += [text[last:start], window]
            last = end
            counts["pii_ip"] += n_ip
            counts["pii_phone"] += n_phone
    return "".join(parts) + text[last:] if parts else text


def load_predicate(spec: str) -> Predicate:
    """`package.module:function` -> the function (an ingest.filters entry)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"ingest.filters: {spec!r} is not 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"ingest.filters: cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"ingest.filters: {spec!r} is not callable")
    return fn


def mostly_letters(text: str, metadata: dict[str, Any], threshold: float = 0.5) -> bool:
    """A simple quality predicate: at least half of the non-space characters are letters."""
    visible = sum(1 for c in text if not c.isspace())
    return visible > 0 and sum(1 for c in text if c.isalpha()) >= threshold * visible


class Cleaner:
    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.predicates = [(spec.rpartition(":")[2], load_predicate(spec)) for spec in cfg.filters]
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str, metadata: dict[str, Any]) -> str | None:
        cfg, counts = self.cfg, self.counts
        text = normalise(text)
        if cfg.remove_control_chars:
            text, n = _CONTROL.subn("", text)
            counts["control_chars_removed"] += n
        if cfg.redact_pii:
            text = redact_pii(text, counts)
        if not text.strip():
            counts["dropped_empty"] += 1
            return None
        size = len(text.encode("utf-8"))
        if size < cfg.min_document_bytes:
            counts["dropped_too_short"] += 1
            return None
        if size > cfg.max_document_bytes:
            counts["dropped_too_long"] += 1
            return None
        for name, keep in self.predicates:
            if not keep(text, metadata):
                counts[f"dropped_by_{name}"] += 1
                return None
        return text
