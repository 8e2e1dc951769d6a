"""Classification over the exported classifier graph, in numpy: no torch."""

from __future__ import annotations

import numpy as np

from gptcore.errors import InputError
from gptcore.runtime.package import ModelPackage
from gptcore.runtime.session import make_session


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so large logits cannot overflow."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class OnnxClassifier:
    def __init__(self, package: ModelPackage, device: str = "auto", threads: int | None = None):
        if package.kind != "classifier":
            raise InputError(f"{package.path}: holds a {package.kind}, not a classifier")
        m = package.meta
        self.package, self.tokenizer = package, package.tokenizer
        self.block_size, self.pad_id, self.eos_id = m["block_size"], m["pad_token_id"], m["eos_token_id"]
        self._labels: list[str] = list(m["labels"])
        self.session = make_session(package.onnx_path, device, threads)

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

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (B, T) ids and mask: the graph pools the last real token, so padding goes last.

        Each text is cut to its first block_size tokens; an empty text becomes the end-of-text
        token, so it still has a position to pool.
        """
        seqs = [enc.ids[: self.block_size] or [self.eos_id]
                for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return ids, mask

    def predict_proba(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(N, K) class probabilities, columns in the order of `labels`."""
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise ValueError("texts: must be a list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if not texts:
            return np.zeros((0, len(self._labels)))
        return np.concatenate([softmax(self.forward_logits(*self.encode(texts[i : i + batch_size])))
                               for i in range(0, len(texts), batch_size)])

    def classify(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        """Per text: the most likely `label`, its probability as `confidence`, and all `probabilities`."""
        probs = self.predict_proba(texts, batch_size)
        return [{"label": self._labels[int(p.argmax())], "confidence": float(p.max()),
                 "probabilities": dict(zip(self._labels, map(float, p)))} for p in probs]
