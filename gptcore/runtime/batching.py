"""Sequences decoding together over one LM session: the core that `OnnxLM.generate_batch` runs in
one go and the serving engine (`gptcore.runtime.engine`) runs step by step as requests come and go.

Each sequence has a row of a `SlotCache` and a window, its last block_size tokens at most, whose
token at position p sits in slot p. A sequence decodes when every token of its window but the
last is in the cache: `decode` then feeds all decoding rows their last token in one graph call,
each at its own position, and samples each row's next token with that sequence's own sampling
and generator. `fill` writes the rest (a new prompt, or a window that slid) in chunks of
PREFILL_CHUNK tokens at fixed offsets, one sequence per call, so every sequence is computed
alike whatever else shares the batch: greedy output does not depend on the company it keeps.

Past the context a window slides as `gptcore.model.GPT.generate` does: once a row's slots are
full, the latest block_size tokens are written again from position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptcore.runtime.kv import SlotCache, cache_width

# Prompt tokens per graph call, and per engine step: bounds a call's activations and how long a
# prompt being admitted holds up the others' next token (on a 2-core CPU, gpt2-124m writes 128
# prompt tokens in about the time of two batch-16 decode steps).
PREFILL_CHUNK = 128


@dataclass(eq=False)
class Sequence:
    """One generation: its tokens, how it samples, where its window stands in the cache."""

    tokens: list[int]  # the prompt, then each token generated (a stop id is not kept)
    max_new_tokens: int
    block_size: int  # the model's context: a window holds at most this many tokens
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()  # ids that end it; empty: always max_new_tokens
    start: int = field(init=False)  # tokens[start:] is the window; slot p of its row holds tokens[start + p]
    cached: int = 0  # slots written
    new: int = 0  # tokens sampled, a final stop id included
    finish: str | None = None  # "stop", "length", or why it was ended early ("cancelled", "error")
    error: BaseException | None = None  # what failed it
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.start = max(0, len(self.tokens) - self.block_size)  # a longer prompt keeps its last window

    @property
    def pending(self) -> int:
        """Window tokens not in the cache yet; a decoding sequence has exactly one."""
        return len(self.tokens) - self.start - self.cached

    @property
    def reserved(self) -> int:
        """The most slots it will ever hold."""
        return min(self.block_size, len(self.tokens) - self.start + self.max_new_tokens - self.new)

    def record(self, token: int) -> bool:
        """Take the sampled `token`; False if it ends the sequence as a stop id (then it is not kept)."""
        self.new += 1
        if token in self.stop_ids:
            self.finish = "stop"
            return False
        self.tokens.append(token)
        if self.new == self.max_new_tokens:
            self.finish = "length"
        elif self.cached == self.block_size:  # no slot left: the latest window, from position 0
            self.start, self.cached = len(self.tokens) - self.block_size, 0
        return True


class DecodeBatch:
    """Rows 0..n-1 of the cache hold the decoding sequences (`decoding[i]` in row i); at most one
    sequence at a time is being filled, in row n, so that finishing it extends the run of rows."""

    def __init__(self, lm: Any, max_rows: int, prefill_chunk: int = PREFILL_CHUNK):
        self.lm, self.max_rows, self.prefill_chunk = lm, max_rows, prefill_chunk
        self.cache = SlotCache(lm)
        self.decoding: list[Sequence] = []
        self.filling: Sequence | None = None
        self.binding = lm.session.io_binding()

    def start(self, seq: Sequence) -> None:
        """Begin filling `seq` (the one being filled, if any, must have joined the decoding rows)."""
        assert self.filling is None and len(self.decoding) < self.max_rows and seq.cached == 0
        self.filling = seq
        self.join_if_filled()

    def join_if_filled(self) -> None:
        if self.filling is not None and self.filling.pending == 1:
            self.decoding.append(self.filling)
            self.filling = None

    def fill(self, budget: int | None = None) -> int:
        """Write the filling sequence's window but its last token, chunk by chunk, until done or
        the next chunk would pass `budget` tokens (a budget of prefill_chunk always takes one);
        the tokens written."""
        seq, written = self.filling, 0
        if seq is not None:
            written = self.write_window(seq, len(self.decoding), budget)
            self.join_if_filled()
        return written

    def write_window(self, seq: Sequence, row: int, budget: int | None = None) -> int:
        end, written = len(seq.tokens) - seq.start - 1, 0  # positions cached .. end - 1
        while seq.cached < end:
            chunk_end = min(end, (seq.cached // self.prefill_chunk + 1) * self.prefill_chunk)
            if budget is not None and written + chunk_end - seq.cached > budget:
                break
            self.reserve(row + 1, chunk_end)
            ids = np.array([seq.tokens[seq.start + seq.cached : seq.start + chunk_end]], dtype=np.int64)
            self.run(row, ids, np.arange(seq.cached, chunk_end)[None])
            written += chunk_end - seq.cached
            seq.cached = chunk_end
        return written

    def reserve(self, rows: int, positions: int) -> None:
        """Room for `rows` rows and `positions` positions: rows grow by doubling, width by WIDTH_STEP."""
        cache = self.cache
        if rows > cache.rows or positions > cache.width:
            grown_rows = cache.rows if rows <= cache.rows else min(self.max_rows, max(rows, 2 * cache.rows))
            cache.resize(grown_rows, max(cache.width, cache_width(positions, self.lm.block_size)))

    def run(self, first_row: int, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One graph call on rows first_row .. first_row + B - 1: (B, T) ids at (B, T) positions ->
        (B, V) logits of each row's last token."""
        lm, binding = self.lm, self.binding
        B, T = ids.shape
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions.astype(np.int64))
        binding.bind_cpu_input("logit_positions", np.full((B, 1), T - 1, dtype=np.int64))
        binding.bind_output("logits", lm.device_type, lm.device_id)  # first: get_outputs()[0]
        self.cache.bind(binding, first_row, B)
        lm.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, -1]

    def decode(self) -> list[tuple[Sequence, int | None]]:
        """One token for every decoding sequence in one graph call: (sequence, its token, or None
        when it sampled a stop id). Windows that slid are written again first."""
        if not self.decoding:
            return []
        for row, seq in enumerate(self.decoding):
            if seq.pending > 1:
                self.write_window(seq, row)
        self.reserve(len(self.decoding), max(seq.cached for seq in self.decoding) + 1)
        ids = np.array([[seq.tokens[-1]] for seq in self.decoding], dtype=np.int64)
        positions = np.array([[seq.cached] for seq in self.decoding], dtype=np.int64)
        logits = self.run(0, ids, positions)
        out = []
        for seq, row_logits in zip(self.decoding, logits):
            seq.cached += 1
            try:
                token = int(sample(row_logits[None], seq.temperature, seq.top_k, seq.top_p, seq.rng)[0])
            except Exception as e:  # this sequence fails alone: the others keep their tokens
                seq.finish, seq.error = "error", e
                out.append((seq, None))
                continue
            out.append((seq, token if seq.record(token) else None))
        return out

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out (finished or cancelled); the last decoding row moves into its row."""
        if seq is self.filling:
            self.filling = None
            return
        row, last = self.decoding.index(seq), len(self.decoding) - 1
        if row != last:
            self.cache.move(last, row, self.decoding[last].cached)
            self.decoding[row] = self.decoding[last]
        self.decoding.pop()
        # The row being filled follows the decoding rows down; one that has written nothing yet
        # may have no row in the cache at all.
        if self.filling is not None and self.filling.cached:
            self.cache.move(last + 1, last, self.filling.cached)
        self.shrink()

    def shrink(self) -> None:
        """Halve the width when the rows use less than half of it: attention reads every slot."""
        cache, held = self.cache, [s.cached + 1 for s in self.decoding]
        if self.filling is not None:
            held.append(self.filling.cached + 1)
        needed = cache_width(max(held, default=1), self.lm.block_size)
        if needed <= cache.width // 2:
            cache.resize(cache.rows, needed)

    @property
    def sequences(self) -> list[Sequence]:
        return self.decoding + ([self.filling] if self.filling is not None else [])


def sample(
    logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng: np.random.Generator
) -> np.ndarray:
    """(B, V) logits -> (B,) next ids. Temperature 0 is greedy: the first maximum on ties, like torch."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    # Shifted to max 0 before dividing: every z is then <= 0, so a tiny temperature takes the rest to
    # -inf (probability 0), never the maximum to inf (inf - inf: NaN probabilities).
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # overflowing to -inf is the point
        z = (z - z.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k, None]  # (B, 1); ties with the k-th stay in, as in torch
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z)  # the maximum's is 1: the sum is never 0
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it
        # already does. The most likely token is therefore always kept.
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
