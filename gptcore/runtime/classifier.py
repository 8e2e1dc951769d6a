"""Classification over the exported classifier graph, in numpy: no torch."""

from __future__ import annotations

import numpy as np

from gptcore.errors import InputError
from gptcore.runtime.package import ModelPackage, check_graph
from gptcore.runtime.session import SessionOptions, make_session, wants_cuda


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so large logits cannot overflow."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def first_block(ids: list[int], block_size: int, eos_id: int) -> list[int]:
    """What the classifier reads of a text's token ids: the first block_size; an empty text becomes
    the end-of-text token, so it still has a position to pool. (The evaluation's scoring reference
    reads the test documents through this too.)"""
    return ids[:block_size] or [eos_id]


class OnnxClassifier:
    def __init__(self, package: ModelPackage, options: SessionOptions | None = None, variant: str = "auto"):
        if package.kind != "classifier":
            raise InputError(f"{package.path}: holds a {package.kind}, not a classifier")
        m = package.meta
        self.package, self.tokenizer = package, package.tokenizer
        self.block_size, self.pad_id, self.eos_id = m["block_size"], m["pad_token_id"], m["eos_token_id"]
        self._labels: list[str] = list(m["labels"])
        options = options or SessionOptions()
        self.variant = package.choose_variant(variant, wants_cuda(options.device))
        self.session = make_session(package.variant_path(self.variant), options)
        check_graph(package, self.variant, self.session)

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def forward_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T) right-padded ids and mask -> (B, K) logits."""
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        return self.session.run(["logits"], feed)[0]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, whole (not yet cut to block_size)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (B, T) ids and mask of the texts (see `pad`)."""
        return self.pad(self.token_ids(texts))

    def pad(self, token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (B, T) ids and mask: the graph pools the last real token, so padding goes last.

        Each text is cut to its `first_block`.
        """
        seqs = [first_block(ids, self.block_size, self.eos_id) for ids in token_ids]
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return ids, mask

    def predict_proba(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(N, K) class probabilities, columns in the order of `labels`."""
        return self.predict_with_lengths(texts, batch_size)[0]

    def predict_with_lengths(self, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) class probabilities, and each text's whole length in tokens (N,): past block_size,
        the part the model never read."""
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise ValueError("texts: must be a list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        probs, lengths = [np.zeros((0, len(self._labels)))], []
        for i in range(0, len(texts), batch_size):
            token_ids = self.token_ids(texts[i : i + batch_size])
            lengths += [len(ids) for ids in token_ids]
            probs.append(softmax(self.forward_logits(*self.pad(token_ids))))
        return np.concatenate(probs), np.asarray(lengths, dtype=np.int64)

    def classify(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        """Per text: the most likely `label`, its probability as `confidence`, and all `probabilities`."""
        probs = self.predict_proba(texts, batch_size)
        return [
            {
                "label": self._labels[int(p.argmax())],
                "confidence": float(p.max()),
                "probabilities": dict(zip(self._labels, map(float, p))),
            }
            for p in probs
        ]
