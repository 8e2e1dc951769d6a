"""Per-document bits per byte: each document scored on its own, with up to block_size tokens of context.

A document is scored the way the model met documents in training: after an <|endoftext|>, up
to and including its closing <|endoftext|> (which costs nats but stands for no bytes). A
document longer than the context is read through windows of block_size tokens that slide by
half a block, each scoring only the targets the previous one did not: every target past the
first window sees between block_size/2 and block_size tokens of its own document, for about
twice the cost of scoring it once. Documents never see each other, so a document's figure
depends neither on its neighbours nor on the order of the split.

Torch-free: the PyTorch evaluation and the ONNX runtime score through the same windows.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.errors import InputError
from gptcore.fsutil import atomic_file

log = logging.getLogger("gptcore.evaluate")

# Floats of logits one batch may hold (64 MB in float32): rows per batch shrink as windows and
# the vocabulary grow, so a 50k vocabulary at block_size 1024 still fits a small machine.
LOGITS_BUDGET = 1 << 24


@dataclass
class DocScores:
    doc_ids: np.ndarray  # (N,) str
    nats: np.ndarray  # (N,) float64: summed NLL of each document's targets
    tokens: np.ndarray  # (N,) int64: targets scored (the document's tokens + its closing <|endoftext|>)
    bytes: np.ndarray  # (N,) int64: UTF-8 bytes of the document

    @property
    def bpb(self) -> np.ndarray:
        return self.nats / math.log(2) / self.bytes


def take_documents(tokens, eot_id: int, max_targets: int, chunk: int = 1 << 20) -> list[np.ndarray]:
    """The first documents of a token stream (documents each followed by <|endoftext|>), whole,
    while their targets total at most `max_targets`; read `chunk` tokens at a time, never all.

    A first document longer than the cap is cut to fit, so there is always one to score.
    """
    docs, total, start, n = [], 0, 0, len(tokens)
    for pos in range(0, n, chunk):
        block = np.asarray(tokens[pos : min(pos + chunk, n)])
        for end in (np.flatnonzero(block == eot_id) + pos).tolist():
            if end > start:  # an empty document has no bytes to score
                if total + end - start + 1 > max_targets:
                    if not docs:
                        log.warning("evaluate: the first document (%d tokens) passes the cap of %d tokens; scoring "
                                    "its first %d", end - start, max_targets, max_targets - 1)
                        docs.append(np.asarray(tokens[start : start + max(1, max_targets - 1)], dtype=np.int64))
                    return docs
                docs.append(np.asarray(tokens[start:end], dtype=np.int64))
                total += end - start + 1
            start = end + 1
    if not docs:
        raise InputError(f"no document to score: {n} tokens hold no <|endoftext|>-terminated document")
    return docs


def document_windows(docs: Sequence[np.ndarray], eot_id: int, block_size: int) -> list[tuple[np.ndarray, int, int]]:
    """(window of up to block_size + 1 ids, how many of its last targets to score, document index)."""
    stride = max(1, block_size // 2)
    windows = []
    for d, doc in enumerate(docs):
        seq = np.concatenate([[eot_id], doc, [eot_id]]).astype(np.int64)
        n, end = len(seq) - 1, min(block_size, len(seq) - 1)
        windows.append((seq[: end + 1], end, d))
        while end < n:
            new_end = min(end + stride, n)
            windows.append((seq[new_end - block_size : new_end + 1], new_end - end, d))
            end = new_end
    return windows


def score_documents(docs: Sequence[np.ndarray], eot_id: int, block_size: int, vocab_size: int,
                    nats_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Summed NLL (nats) of each document's targets.

    `nats_fn(inputs, targets)` takes (B, W) ids and next-token targets (-1 where not scored)
    and returns (B, W) NLLs, 0 where not scored. Inputs are right-padded: under causal
    attention padding after a position cannot change it.
    """
    windows = sorted(document_windows(docs, eot_id, block_size), key=lambda w: -len(w[0]))
    nats = np.zeros(len(docs), dtype=np.float64)
    i = 0
    while i < len(windows):
        width = len(windows[i][0]) - 1
        rows = windows[i : i + max(1, LOGITS_BUDGET // (width * vocab_size))]
        inputs = np.full((len(rows), width), eot_id, dtype=np.int64)
        targets = np.full((len(rows), width), -1, dtype=np.int64)
        for r, (seq, scored, _) in enumerate(rows):
            inputs[r, : len(seq) - 1] = seq[:-1]
            targets[r, len(seq) - 1 - scored : len(seq) - 1] = seq[len(seq) - scored :]
        np.add.at(nats, [d for _, _, d in rows], np.asarray(nats_fn(inputs, targets), dtype=np.float64).sum(1))
        i += len(rows)
    return nats


def distribution(scores: DocScores) -> dict:
    """The per-document bits per byte summarised, and the split's pooled figure beside it."""
    bpb = scores.bpb
    p10, median, p90 = np.percentile(bpb, [10, 50, 90]).tolist()
    return {"documents": len(bpb), "mean": float(bpb.mean()), "median": median, "p10": p10, "p90": p90,
            "min": float(bpb.min()), "max": float(bpb.max()),
            "bpb": float(scores.nats.sum() / math.log(2) / scores.bytes.sum()),
            "tokens": int(scores.tokens.sum()), "bytes": int(scores.bytes.sum())}


def documents_digest(doc_ids: Sequence[str], texts: Sequence[str]) -> str:
    """A digest of the scored documents (ids and text), not of their tokens: bits per byte
    compares models across tokenizers, so pairing does too."""
    h = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts):
        h.update(f"{doc_id}\0{len(text)}\0{text}".encode())
    return h.hexdigest()


def save_doc_scores(path: str | Path, scores: DocScores) -> None:
    """npz with plain arrays only (document ids as fixed-width unicode): it reads back without pickle."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, doc_ids=np.asarray(scores.doc_ids, dtype=str), nats=scores.nats, tokens=scores.tokens,
                     bytes=scores.bytes)


def read_doc_scores(path: str | Path) -> DocScores:
    with np.load(path, allow_pickle=False) as f:
        return DocScores(f["doc_ids"], f["nats"], f["tokens"], f["bytes"])
