"""Text generation over the exported LM graph, with the KV cache, in numpy: no torch.

Greedy decoding follows `gptcore.model.GPT.generate` token for token (the export parity check
relies on it): the prompt is cut to its last block_size tokens, the cache grows one token per
step, and when it would pass block_size it is dropped and the latest window re-run from
position 0. A batch is left-padded, each row counting positions from its first real token, and
slides the same way (each row keeps its own last block_size tokens).

Decoding runs through IOBinding: the cache lives in two buffers per layer, allocated once on the
session's device at the size the request needs, and each step reads the past from one and
writes the present into the other, so on CUDA the cache never leaves the GPU and no step
allocates it anew. Only the last position's logits come back to the host (the graph computes
logits only where `logit_positions` asks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from numbers import Integral, Real

import numpy as np

from gptcore.errors import InputError
from gptcore.runtime.package import ModelPackage
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


def sample(
    logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng: np.random.Generator
) -> np.ndarray:
    """(B, V) logits -> (B,) next ids. Temperature 0 is greedy: the first maximum on ties, like torch."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k, None]  # (B, 1); ties with the k-th stay in, as in torch
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
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


class KVBuffers:
    """The cache of one generation: per layer keys and values, ping-ponged between two buffers.

    Each buffer holds up to (B, H, capacity, D) on the session's device; a step binds the first
    (B, H, P, D) of one as the past and the first (B, H, P + T, D) of the other as the present.
    """

    def __init__(self, lm: OnnxLM, batch: int, capacity: int):
        import onnxruntime as ort

        self.lm, self.batch, self.past = lm, batch, 0
        size = [batch * lm.n_head * capacity * lm.head_dim]
        self.buffers = [
            [
                ort.OrtValue.ortvalue_from_shape_and_type(size, lm.cache_dtype, lm.device_type, lm.device_id)
                for _ in lm.cache_in
            ]
            for _ in range(2)
        ]

    def reset(self) -> None:
        self.past = 0

    def bind(self, binding, new_tokens: int) -> None:
        lm, (past, present) = self.lm, self.buffers
        shape_in = [self.batch, lm.n_head, self.past, lm.head_dim]
        shape_out = [self.batch, lm.n_head, self.past + new_tokens, lm.head_dim]
        for name_in, name_out, buf_in, buf_out in zip(lm.cache_in, lm.cache_out, past, present):
            binding.bind_input(name_in, lm.device_type, lm.device_id, lm.cache_dtype, shape_in, buf_in.data_ptr())
            binding.bind_output(name_out, lm.device_type, lm.device_id, lm.cache_dtype, shape_out, buf_out.data_ptr())

    def advance(self, new_tokens: int) -> None:
        self.buffers.reverse()  # this step's present is the next step's past
        self.past += new_tokens


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
        self.cache_in = [f"past_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]
        self.cache_out = [f"present_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.cache_dtype = np.float16 if inputs[self.cache_in[0]] == "tensor(float16)" else np.float32
        self.selects_logits = "logit_positions" in inputs  # packages of format 1 return every position's logits
        self.device_type = "cuda" if self.provider == CUDA else "cpu"
        self.device_id = options.device_id if self.device_type == "cuda" else 0

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_head, 0, self.head_dim), dtype=self.cache_dtype) for _ in self.cache_in]

    def inputs(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, last_only: bool
    ) -> dict[str, np.ndarray]:
        B, T = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "position_ids": positions.astype(np.int64),
            "attention_mask": mask.astype(np.int64),
        }
        if self.selects_logits:
            wanted = np.arange(T - 1, T) if last_only else np.arange(T)
            feed["logit_positions"] = np.broadcast_to(wanted, (B, len(wanted))).astype(np.int64)
        return feed

    def step(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: (B, T) new ids, positions, (B, P + T) mask -> (B, T, V) logits and the grown cache."""
        feed = self.inputs(ids, positions, mask, last_only=False) | dict(zip(self.cache_in, cache))
        logits, *present = self.session.run(["logits", *self.cache_out], feed)
        return logits, present

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) ids, no padding, empty cache -> (B, T, V) logits."""
        B, T = ids.shape
        positions = np.broadcast_to(np.arange(T), (B, T))
        logits, _ = self.step(ids, positions, np.ones((B, T), dtype=np.int64), self.empty_cache(B))
        return logits

    def windows(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's last block_size tokens, left-padded: (B, W) ids, mask and positions."""
        windows = [row[-self.block_size :] for row in rows]
        width = max(len(w) for w in windows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, w in enumerate(windows):
            ids[i, width - len(w) :], mask[i, width - len(w) :] = w, 1
        return ids, mask, np.clip(mask.cumsum(axis=1) - 1, 0, None)  # each row counts from its first real token

    def decode(
        self,
        rows: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
    ) -> Iterator[np.ndarray]:
        """(B,) next ids of every row, step by step, for up to max_new_tokens steps (the caller stops early)."""
        rng = np.random.default_rng(seed)
        rows = [list(r) for r in rows]
        B = len(rows)
        cache = KVBuffers(self, B, min(self.block_size, max(len(r) for r in rows) + max_new_tokens))
        ids = mask = positions = None
        binding = self.session.io_binding()
        for _ in range(max_new_tokens):
            if ids is None or mask.shape[1] + 1 > self.block_size:  # first step, or cache full: (re)start
                ids, mask, positions = self.windows(rows)
                cache.reset()
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in self.inputs(ids, positions, mask, last_only=True).items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("logits", self.device_type, self.device_id)  # first: get_outputs()[0]
            cache.bind(binding, ids.shape[1])
            self.session.run_with_iobinding(binding)
            cache.advance(ids.shape[1])
            next_ids = sample(binding.get_outputs()[0].numpy()[:, -1], temperature, top_k, top_p, rng)
            yield next_ids
            for row, token in zip(rows, next_ids):
                row.append(int(token))
            ids, positions = next_ids[:, None].astype(np.int64), positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)

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
        for next_ids in self.decode([prompt_ids], max_new_tokens, temperature, top_k, top_p, seed):
            if stop_at_eos and next_ids[0] in self.stop_ids:
                return
            yield int(next_ids[0])

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
        """New token ids after each prompt, decoded as one batch (left padding + attention mask)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        check_batch(prompts)
        for prompt in prompts:
            self.check_ids(prompt)
        out, done = [[] for _ in prompts], np.zeros(len(prompts), dtype=bool)
        for next_ids in self.decode(prompts, max_new_tokens, temperature, top_k, top_p, seed):
            for i in np.flatnonzero(~done):
                if stop_at_eos and next_ids[i] in self.stop_ids:
                    done[i] = True
                else:
                    out[i].append(int(next_ids[i]))
            if done.all():
                break
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
