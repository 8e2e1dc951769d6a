"""Stop sequences: generated text cut before the first stop string, streamed without ever showing one.

A stop string can arrive split over several pieces, so a piece's tail that could be the start of
one is held back until the next piece says whether it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gptcore.runtime.lm import text_pieces

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's bound on `stop`: up to 4 sequences


def check_stops(stop: str | list[str] | None, field: str = "stop") -> list[str]:
    """`stop` as a list of non-empty strings; ValueError naming the field."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise ValueError(f"{field}: a string or a list of at most {MAX_STOPS} strings")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"{field}[{i}]: must be a string of 1 to {MAX_STOP_CHARS} characters")
    return stops


class StopAt:
    """Feed text pieces in order; get back the text that may be shown. `stopped` once a stop string came."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once generation ended without a stop string."""
        held, self.held = ("", self.held) if self.stopped else (self.held, "")
        return held


@dataclass
class Decoded:
    """One generation once decoded: the tokens it took and why it ended ("stop" or "length")."""

    tokens: int = 0
    finish_reason: str = "length"


def decoded_text(
    model: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stops: list[str],
    decoded: Decoded | None = None,
) -> Iterator[str]:
    """The text `model` (an OnnxLM or OnnxChat) generates after `prompt_ids`, piece by piece, cut
    before the first stop string; `decoded` counts its tokens and says how it ended: at a stop id
    or a stop string ("stop", decoding ends there), or after max_new_tokens ("length")."""
    decoded = decoded if decoded is not None else Decoded()

    def counted() -> Iterator[int]:
        for token in model.iter_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed):
            decoded.tokens += 1
            yield token

    cut = StopAt(stops)
    for piece in text_pieces(model.tokenizer, counted()):
        if shown := cut.feed(piece):
            yield shown
        if cut.stopped:
            break
    if rest := cut.flush():
        yield rest
    decoded.finish_reason = "stop" if cut.stopped or decoded.tokens < max_new_tokens else "length"
