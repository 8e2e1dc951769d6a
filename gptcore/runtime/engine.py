"""The serving engine: one per served LM or chat model, batching every request that is generating.

A request `submit`s its prompt and sampling and gets a `Generation` to read tokens from. The
engine's own thread runs a step loop over a `DecodeBatch`: at each step boundary it drops the
sequences that ended or were cancelled, admits waiting requests in order while the running
sequences and the KV budget allow, writes the prompt of the one being admitted (at most
prefill_chunk tokens a step, so a long prompt does not stall the others for long), and then
decodes one token for every running sequence in one graph call. Each request samples with its
own parameters and generator, receives its tokens as they come, and leaves the batch the moment
it ends (a stop id, max_new_tokens, `cancel()`: a stop string seen, or the client gone). A
failure fails the requests of the step that failed; the engine goes on with the next requests.

Bounds: at most max_running sequences decode at once, and the cache they may grow to (rows x
slots, the widest reservation's width) stays within kv_tokens; requests beyond wait, and beyond
max_waiting the caller gets `EngineFull` (the server answers 429).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from gptcore.runtime.batching import PREFILL_CHUNK, DecodeBatch, Sequence
from gptcore.runtime.kv import cache_width
from gptcore.runtime.lm import check_sampling

log = logging.getLogger("gptcore.engine")

END = object()  # what a Generation's queue holds once its last token is in


class EngineFull(Exception):
    """The engine's queue of waiting requests is full."""


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = 32
    """Sequences decoding at once: the batch of each decode call, the rows of the cache."""
    max_waiting: int = 256
    """Requests that may wait for a row beyond those; more are refused (EngineFull)."""
    kv_tokens: int = 32768
    """Cache slots (rows x width) the running sequences may reserve: bytes = this x layers x 2 x C x 4 (fp32)."""
    prefill_chunk: int = PREFILL_CHUNK
    """Prompt tokens written per step while others decode."""

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "kv_tokens", "prefill_chunk"):
            if getattr(self, name) < (0 if name == "max_waiting" else 1):
                raise ValueError(f"{name}: must be >= {0 if name == 'max_waiting' else 1}, got {getattr(self, name)}")


class Observer(Protocol):
    """What the engine reports as it runs (the server's Prometheus metrics implement it)."""

    def first_token(self, model: str, seconds: float) -> None: ...
    def token_gap(self, model: str, seconds: float) -> None: ...
    def step(self, model: str, tokens: int, running: int, waiting: int, kv_reserved: int, kv_tokens: int) -> None: ...


class Generation:
    """One request's tokens as the engine decodes them; iterate to read them, `cancel` to stop early."""

    def __init__(self, seq: Sequence):
        self.seq, self.tokens = seq, queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.submitted = self.last = time.perf_counter()
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[int]:
        while (token := self.tokens.get()) is not END:
            yield token
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def finish_reason(self) -> str | None:
        return self.seq.finish


class Engine:
    def __init__(self, lm: Any, limits: EngineLimits | None = None, observer: Observer | None = None, name: str = ""):
        if not lm.fixed_cache:
            raise ValueError(f"{lm.package.path}: a package of format 3 or later is needed (re-export it)")
        self.lm, self.limits, self.observer = lm, limits or EngineLimits(), observer
        self.name = name or lm.KIND
        self.batch = DecodeBatch(lm, self.limits.max_running, self.limits.prefill_chunk)
        self.waiting: deque[Generation] = deque()
        self.running: dict[Sequence, Generation] = {}
        self.wake, self.closed = threading.Condition(), False
        self.thread = threading.Thread(target=self.loop, name=f"gptcore-engine-{self.name}", daemon=True)
        self.thread.start()

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def submit(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Queue a generation; `EngineFull` if max_waiting requests already wait."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self.lm.check_ids(prompt_ids)
        stops = frozenset(self.lm.stop_ids if stop_at_eos else ())
        seq = Sequence(list(prompt_ids), max_new_tokens, self.lm.block_size, temperature, top_k, top_p, seed, stops)
        generation = Generation(seq)
        with self.wake:
            if self.closed:
                raise EngineFull(f"the {self.name} engine is closed")
            if len(self.waiting) >= self.limits.max_waiting:
                raise EngineFull(f"{len(self.waiting)} requests wait (at most {self.limits.max_waiting})")
            self.waiting.append(generation)
            self.wake.notify()
        return generation

    def iter_ids(self, prompt_ids: list[int], *sampling: Any, stop_at_eos: bool = True) -> Iterator[int]:
        """`OnnxLM.iter_ids` through the engine: the tokens of one generation; closing it cancels it."""
        generation = self.submit(prompt_ids, *sampling, stop_at_eos=stop_at_eos)
        try:
            yield from generation
        finally:
            generation.cancel()

    def generate_ids(self, prompt_ids: list[int], *sampling: Any, stop_at_eos: bool = True) -> list[int]:
        return list(self.iter_ids(prompt_ids, *sampling, stop_at_eos=stop_at_eos))

    def close(self) -> None:
        """Take no more requests; the thread ends once those admitted and waiting are done."""
        with self.wake:
            self.closed = True
            self.wake.notify()

    # The step loop: everything below runs on the engine's thread.

    def loop(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.running or self.closed):
                    self.wake.wait()
                if self.closed and not (self.waiting or self.running):
                    return
            try:
                self.step()
            except Exception as e:  # a failed graph call: its requests fail, the engine goes on
                log.exception("engine %s: a step failed", self.name)
                for seq in list(self.running):
                    self.end(seq, "error", e)

    def step(self) -> None:
        for seq, generation in list(self.running.items()):
            if generation.cancelled.is_set():
                self.end(seq, "cancelled")
        budget = self.limits.prefill_chunk  # prompt tokens this step: one chunk's worth
        while budget > 0:
            if self.batch.filling is None and not self.admit():
                break
            seq = self.batch.filling
            budget -= self.batch.fill(budget)
            if seq is not None and self.batch.filling is seq:  # its next chunk does not fit: the next step
                break
        decoded = self.batch.decode()
        now = time.perf_counter()
        for seq, token in decoded:
            generation = self.running[seq]
            if token is not None:
                if self.observer is not None:
                    first = seq.new == 1
                    gap = now - (generation.submitted if first else generation.last)
                    (self.observer.first_token if first else self.observer.token_gap)(self.name, gap)
                generation.last = now
                generation.tokens.put(token)
            if seq.finish is not None:
                self.end(seq, seq.finish, seq.error)
        if self.observer is not None:
            running, waiting = len(self.batch.decoding), len(self.waiting)
            self.observer.step(self.name, len(decoded), running, waiting, self.reserved(), self.limits.kv_tokens)

    def reserved(self, extra: Sequence | None = None) -> int:
        """Cache slots the running sequences (and `extra`) may grow to: rows x the widest reservation."""
        seqs = [*self.running, *([extra] if extra is not None else [])]
        widest = max((seq.reserved for seq in seqs), default=0)
        return len(seqs) * cache_width(widest, self.lm.block_size)

    def admit(self) -> bool:
        """Start filling the first waiting request if a row and the KV budget allow; whether one started."""
        with self.wake:
            while self.waiting and self.waiting[0].cancelled.is_set():
                self.finish_waiting(self.waiting.popleft())
            if not self.waiting or len(self.running) >= self.limits.max_running:
                return False
            generation = self.waiting[0]
            seq = generation.seq
            if self.running and self.reserved(seq) > self.limits.kv_tokens:
                return False  # it waits for running sequences to end (alone, it is always admitted)
            self.waiting.popleft()
        self.running[seq] = generation
        self.batch.start(seq)
        return True

    def finish_waiting(self, generation: Generation) -> None:
        generation.seq.finish = "cancelled"
        generation.tokens.put(END)

    def end(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        generation = self.running.pop(seq)
        if seq in self.batch.sequences:
            self.batch.remove(seq)
        seq.finish = seq.finish or reason
        generation.error = error
        generation.tokens.put(END)
