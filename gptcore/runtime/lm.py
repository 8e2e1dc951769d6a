"""Text generation over the exported LM graph, with the KV cache, in numpy: no torch.

Greedy decoding follows `gptcore.model.GPT.generate` token for token (the export parity check
relies on it): the prompt is cut to its last block_size tokens, the cache grows one token per
step, and when it would pass block_size the latest window is written again from position 0.

A package of format 3 decodes through `gptcore.runtime.batching`: every row writes its new keys
and values into its slots of one preallocated buffer on the session's device, in place, rows of
different lengths side by side without padding (the serving engine runs the same core). Older
packages (a growing cache, concatenated each step) decode as they always did: a batch
left-padded, each row counting positions from its first real token, the cache ping-ponged
between two buffers bound through IOBinding. Either way only the last position's logits come
back to the host (the graph computes logits only where `logit_positions` asks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from numbers import Integral, Real

import numpy as np

from gptcore.errors import InputError
from gptcore.runtime.batching import DecodeBatch, Sequence, sample
from gptcore.runtime.kv import GrowingCache
from gptcore.runtime.package import ModelPackage, check_graph
from gptcore.runtime.session import CUDA, SessionOptions, make_session, wants_cuda

MAX_NEW_TOKENS = 4096
MAX_BATCH = 64


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    is_int = isinstance(max_new_tokens, Integral) and not isinstance(max_new_tokens, bool)
    if not (is_int and 1 <= max_new_tokens <= MAX_NEW_TOKENS):
        raise ValueError(f"max_new_tokens: must be an integer in [1, {MAX_NEW_TOKENS}], got {max_new_tokens!r}")
    if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(f"top_k: must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p: must be in (0, 1] or None, got {top_p!r}")


def check_batch(prompts) -> None:
    if not isinstance(prompts, (list, tuple)) or not 1 <= len(prompts) <= MAX_BATCH:
        raise ValueError(
            f"prompts: batch size must be in [1, {MAX_BATCH}], got "
            f"{len(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__}"
        )


def text_pieces(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """The text of `token_ids` piece by piece as the ids come; the pieces join to their decoded text.

    A byte-level token can end inside a multi-byte character: text is held back until it
    decodes without a trailing replacement character.
    """
    new, sent = [], ""
    for token in token_ids:
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if len(text) > len(sent):
        yield text[len(sent) :]


class OnnxLM:
    KIND, WHAT = "lm", "language model"

    def __init__(self, package: ModelPackage, options: SessionOptions | None = None, variant: str = "auto"):
        if package.kind != self.KIND:
            raise InputError(f"{package.path}: holds a {package.kind}, not a {self.WHAT}")
        m = package.meta
        options = options or SessionOptions()
        self.package, self.tokenizer = package, package.tokenizer
        self.block_size, self.n_layer = m["block_size"], m["n_layer"]
        self.n_head, self.head_dim, self.vocab_size = m["n_head"], m["head_dim"], m["vocab_size"]
        self.eos_id, self.pad_id = m["eos_token_id"], m["pad_token_id"]
        self.stop_ids = {self.eos_id}  # the ids that end a generation (a chat model's <|end|> too)
        self.variant = package.choose_variant(variant, wants_cuda(options.device))
        self.session = make_session(package.variant_path(self.variant), options)
        check_graph(package, self.variant, self.session)  # at load, not as an IndexError mid-request
        self.cache_in = [f"past_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]
        self.cache_out = [f"present_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.cache_dtype = np.float16 if inputs[self.cache_in[0]] == "tensor(float16)" else np.float32
        self.selects_logits = "logit_positions" in inputs  # packages of format 1 return every position's logits
        self.fixed_cache = "attention_mask" not in inputs  # format 3: the cache written in place
        self.device_type = "cuda" if self.provider == CUDA else "cpu"
        self.device_id = options.device_id if self.device_type == "cuda" else 0

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) ids, no padding, from position 0 -> (B, T, V) logits."""
        B, T = ids.shape
        positions = np.broadcast_to(np.arange(T), (B, T)).astype(np.int64)
        feed = {"input_ids": ids.astype(np.int64), "position_ids": positions}
        if not self.fixed_cache:
            feed["attention_mask"] = np.ones((B, T), dtype=np.int64)
        if self.selects_logits:
            feed["logit_positions"] = feed["position_ids"]
        width = T if self.fixed_cache else 0  # the fixed cache's slots for T positions; an empty growing one
        empty = np.zeros((B, self.n_head, width, self.head_dim), dtype=self.cache_dtype)
        return self.session.run(["logits"], feed | dict.fromkeys(self.cache_in, empty))[0]

    def rows(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stop_at_eos: bool,
    ) -> Iterator[tuple[int, int]]:
        """(row, token) for each token decoded after each prompt, as decoded; row i samples with seed + i."""
        if not self.fixed_cache:
            yield from self.rows_growing(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
            return
        batch = DecodeBatch(self, max_rows=len(prompts))
        stop_ids = frozenset(self.stop_ids if stop_at_eos else ())
        row_of = {}
        for i, prompt in enumerate(prompts):
            seed_i = None if seed is None else seed + i
            seq = Sequence(list(prompt), max_new_tokens, self.block_size, temperature, top_k, top_p, seed_i, stop_ids)
            row_of[seq] = i
            batch.start(seq)
            batch.fill()
        while batch.decoding:
            for seq, token in batch.decode():
                if seq.error is not None:
                    raise seq.error
                if token is not None:
                    yield row_of[seq], token
                if seq.finish is not None:
                    batch.remove(seq)

    def rows_growing(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stop_at_eos: bool,
    ) -> Iterator[tuple[int, int]]:
        """`rows` on a format 1 or 2 graph: one left-padded batch, one generator for every row."""
        rng = np.random.default_rng(seed)
        rows = [list(r) for r in prompts]
        B, done = len(rows), np.zeros(len(rows), dtype=bool)
        cache = GrowingCache(self, B, min(self.block_size, max(len(r) for r in rows) + max_new_tokens))
        ids = mask = positions = None
        binding = self.session.io_binding()
        for _ in range(max_new_tokens):
            if ids is None or mask.shape[1] + 1 > self.block_size:  # first step, or cache full: (re)start
                ids, mask, positions = self.windows(rows)
                cache.reset()
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
            if self.selects_logits:
                feed["logit_positions"] = np.full((B, 1), ids.shape[1] - 1, dtype=np.int64)
            for name, value in feed.items():
                binding.bind_cpu_input(name, value.astype(np.int64))
            binding.bind_output("logits", self.device_type, self.device_id)  # first: get_outputs()[0]
            cache.bind(binding, ids.shape[1])
            self.session.run_with_iobinding(binding)
            cache.advance(ids.shape[1])
            next_ids = sample(binding.get_outputs()[0].numpy()[:, -1], temperature, top_k, top_p, rng)
            for i in np.flatnonzero(~done):
                if stop_at_eos and next_ids[i] in self.stop_ids:
                    done[i] = True
                else:
                    yield int(i), int(next_ids[i])
            if done.all():
                return
            for row, token in zip(rows, next_ids):
                row.append(int(token))
            ids, positions = next_ids[:, None].astype(np.int64), positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)

    def windows(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's last block_size tokens, left-padded: (B, W) ids, mask and positions."""
        windows = [row[-self.block_size :] for row in rows]
        width = max(len(w) for w in windows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, w in enumerate(windows):
            ids[i, width - len(w) :], mask[i, width - len(w) :] = w, 1
        return ids, mask, np.clip(mask.cumsum(axis=1) - 1, 0, None)  # each row counts from its first real token

    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """New token ids after `prompt_ids` (a stop id ends them early unless stop_at_eos=False)."""
        return list(self.iter_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos))

    def iter_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """`generate_ids`, one id at a time as each is decoded."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self.check_ids(prompt_ids)
        for _, token in self.rows([prompt_ids], max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos):
            yield token

    def generate_batch_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> list[list[int]]:
        """New token ids after each prompt, decoded as one batch (prompt i samples with seed + i)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        check_batch(prompts)
        for prompt in prompts:
            self.check_ids(prompt)
        out = [[] for _ in prompts]
        for row, token in self.rows(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos):
            out[row].append(token)
        return out

    def check_ids(self, ids: list[int]) -> None:
        if len(ids) == 0:
            raise ValueError("prompt: must hold at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt: must be a non-empty string, got {prompt!r}")
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """The continuation of `prompt` (without the prompt)."""
        new = self.generate_ids(self.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed)
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """`generate`, as text pieces while tokens are decoded; the pieces join to `generate`'s text."""
        return text_pieces(
            self.tokenizer, self.iter_ids(self.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed)
        )

    def generate_batch(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continuations of several prompts in one batch (greedy: the same as `generate` one at a time)."""
        check_batch(prompts)
        new = self.generate_batch_ids(
            [self.encode(p) for p in prompts], max_new_tokens, temperature, top_k, top_p, seed
        )
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
