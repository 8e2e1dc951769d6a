"""Labelled passages for sequence classification, cut from the ingested splits.

Documents are cut into passages of `passage_tokens` tokens that inherit their document's label
(for Shakespeare: the play's genre). Classes come from the train split, in a stable order:
integer labels numerically, names alphabetically. Torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.errors import InputError
from gptcore.results import read_split

log = logging.getLogger("gptcore.data")


@dataclass
class Passages:
    ids: list[list[int]]
    labels: np.ndarray  # (N,) class index
    doc_ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def spread(self, n: int) -> Passages:
        """At most `n` passages, evenly spread over the documents (not just the first ones)."""
        if len(self) <= n:
            return self
        picks = np.linspace(0, len(self) - 1, num=n).astype(np.int64)
        return Passages([self.ids[i] for i in picks], self.labels[picks], [self.doc_ids[i] for i in picks])


def class_order(label: str) -> tuple:
    """Integer labels (read from CSV or Parquet as numbers) in numeric order, before any names."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def make_passages(
    data_dir: str | Path, split: str, label_field: str, tok, passage_tokens: int, classes: list[str] | None
) -> tuple[Passages, list[str]]:
    """Cut every document of `split` into passages; classes come from the train split."""
    table = read_split(data_dir, split, ["id", "text", label_field])
    labels = table.column(label_field).to_pylist()
    ids = table.column("id").to_pylist()
    for doc_id, label in zip(ids, labels):
        if label is None or (isinstance(label, str) and not label.strip()):
            raise InputError(
                f"{Path(data_dir) / (split + '.parquet')}: document {doc_id!r} has no {label_field!r} label"
            )
    labels = [str(label) for label in labels]
    if classes is None:
        classes = sorted(set(labels), key=class_order)
        if len(classes) < 2:
            raise InputError(f"label field {label_field!r} has {len(classes)} distinct value(s) in train; need >= 2")
    index = {c: i for i, c in enumerate(classes)}
    out = Passages([], np.zeros(0, dtype=np.int64), [])
    out_labels, unseen = [], 0
    min_len = max(1, passage_tokens // 2)
    encodings = tok.encode_batch(table.column("text").to_pylist(), add_special_tokens=False)
    for doc_id, label, enc in zip(ids, labels, encodings):
        if label not in index:
            unseen += 1
            continue
        for start in range(0, len(enc.ids), passage_tokens):
            chunk = enc.ids[start : start + passage_tokens]
            if len(chunk) >= min_len:
                out.ids.append(chunk)
                out_labels.append(index[label])
                out.doc_ids.append(doc_id)
    if unseen:
        log.warning("finetune: %s: skipped %d document(s) whose label is not among the train classes", split, unseen)
    out.labels = np.asarray(out_labels, dtype=np.int64)
    if not len(out):
        raise InputError(f"split {split!r} yields no passages of >= {min_len} tokens")
    return out, classes
