"""Text generation over the exported LM graph, with the KV cache, in numpy: no torch.

Greedy decoding follows `gptcore.model.GPT.generate` token for token (the export parity check
relies on it): the prompt is cut to its last block_size tokens, the cache grows one token per
step, and when it would pass block_size it is dropped and the latest window re-run from
position 0.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from gptcore.errors import InputError
from gptcore.runtime.package import ModelPackage
from gptcore.runtime.session import make_session

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


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> np.ndarray:
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


class OnnxLM:
    def __init__(self, package: ModelPackage, device: str = "auto", threads: int | None = None):
        if package.kind != "lm":
            raise InputError(f"{package.path}: holds a {package.kind}, not a language model")
        m = package.meta
        self.package, self.tokenizer = package, package.tokenizer
        self.block_size, self.n_layer = m["block_size"], m["n_layer"]
        self.n_head, self.head_dim, self.vocab_size = m["n_head"], m["head_dim"], m["vocab_size"]
        self.eos_id, self.pad_id = m["eos_token_id"], m["pad_token_id"]
        self.session = make_session(package.onnx_path, device, threads)
        self.cache_in = [f"past_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]
        self.cache_out = [f"present_{kind}_{i}" for i in range(self.n_layer) for kind in ("key", "value")]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_head, 0, self.head_dim), dtype=np.float32) for _ in self.cache_in]

    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
             cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: (B, T) new ids, positions, (B, P + T) mask -> (B, T, V) logits and the grown cache."""
        feed = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64),
                "attention_mask": mask.astype(np.int64), **dict(zip(self.cache_in, cache))}
        logits, *present = self.session.run(["logits", *self.cache_out], feed)
        return logits, present

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) ids, no padding, empty cache -> (B, T, V) logits."""
        B, T = ids.shape
        positions = np.broadcast_to(np.arange(T), (B, T))
        logits, _ = self.step(ids, positions, np.ones((B, T), dtype=np.int64), self.empty_cache(B))
        return logits

    def nats(self, ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(B, T) ids and their next-token targets (-1: not scored) -> (B, T) NLL in nats, 0 where not scored."""
        logits = self.forward_logits(ids)
        peak = logits.max(axis=-1, keepdims=True)
        log_z = (np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]).astype(np.float64)
        scored = targets >= 0
        picked = np.take_along_axis(logits, np.where(scored, targets, 0)[..., None], axis=-1)[..., 0]
        return np.where(scored, log_z - picked, 0.0)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop_at_eos: bool = True) -> list[int]:
        """New token ids after `prompt_ids` (the end-of-text id ends them early unless stop_at_eos=False)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self.check_ids(prompt_ids)
        rng = np.random.default_rng(seed)
        ids = list(prompt_ids)
        window, cache, pos, new = ids[-self.block_size :], self.empty_cache(1), 0, []
        for _ in range(max_new_tokens):
            if pos + len(window) > self.block_size:  # cache full: restart from the latest window
                window, cache, pos = ids[-self.block_size :], self.empty_cache(1), 0
            T = len(window)
            logits, cache = self.step(np.array([window]), np.arange(pos, pos + T)[None], np.ones((1, pos + T)), cache)
            pos += T
            next_id = int(sample(logits[:, -1], temperature, top_k, top_p, rng)[0])
            if stop_at_eos and next_id == self.eos_id:
                break
            ids.append(next_id)
            new.append(next_id)
            window = [next_id]
        return new

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

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> str:
        """The continuation of `prompt` (without the prompt)."""
        new = self.generate_ids(self.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed)
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def generate_batch(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> list[str]:
        """Continuations of several prompts in one batch: left padding + attention mask + cache.

        Rows share one cache, so the window cannot slide per row: the longest prompt plus the new
        tokens must fit the context (greedy results then equal `generate` one prompt at a time).
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if not isinstance(prompts, (list, tuple)) or not 1 <= len(prompts) <= MAX_BATCH:
            raise ValueError(f"prompts: batch size must be in [1, {MAX_BATCH}], got "
                             f"{len(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__}")
        encoded = [self.encode(p)[-self.block_size :] for p in prompts]
        width = max(len(e) for e in encoded)
        # The last new token is never fed back, so it needs no position.
        if width + max_new_tokens - 1 > self.block_size:
            raise ValueError(f"max_new_tokens: the longest prompt ({width} tokens) + {max_new_tokens} new tokens "
                             f"exceeds the context of {self.block_size} tokens; generate one prompt at a time "
                             "to slide the window")
        B = len(prompts)
        ids = np.full((B, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, width), dtype=np.int64)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :], mask[i, width - len(e) :] = e, 1
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)  # each row counts from its first real token
        rng = np.random.default_rng(seed)
        cache, out, done = self.empty_cache(B), [[] for _ in range(B)], np.zeros(B, dtype=bool)
        for _ in range(max_new_tokens):
            logits, cache = self.step(ids, positions, mask, cache)
            next_ids = sample(logits[:, -1], temperature, top_k, top_p, rng)
            for i in np.flatnonzero(~done):
                if next_ids[i] == self.eos_id:
                    done[i] = True
                else:
                    out[i].append(int(next_ids[i]))
            if done.all():
                break
            ids = next_ids[:, None].astype(np.int64)
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]
