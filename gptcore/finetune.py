"""Fine-tuning for sequence classification: the pretrained GPT plus a head over the last token.

Documents are cut into passages of `passage_tokens` tokens that inherit their document's label
(for Shakespeare: the play's genre). Train passages come from the train split only, model
selection and early stopping use the val split, and the test split is left to evaluation, so
no passage of a test scene is ever trained on.

Output: OUT/checkpoints/step_*/, OUT/best/ (highest validation macro-F1), OUT/result.json.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptcore.checkpoint import load_lm
from gptcore.config import FinetuneConfig
from gptcore.data.ingest import read_split
from gptcore.errors import InputError
from gptcore.fsutil import read_stage_output, write_json
from gptcore.metrics import classification_report
from gptcore.model import GPTClassifier
from gptcore.peft import apply_peft, trainable_fraction
from gptcore.pretrain import load_pretrained
from gptcore.tokenizer import PAD, load_tokenizer
from gptcore.tracking import Tracking, stage_run
from gptcore.distributed import setup
from gptcore.train import fit

log = logging.getLogger("gptcore.finetune")


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
            raise InputError(f"{Path(data_dir) / (split + '.parquet')}: document {doc_id!r} has no {label_field!r} label")
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


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with `pad_id`, (B, T) mask of real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class PassageBatches:
    """Random batches of passages (with replacement), drawn with a generator of its own."""

    def __init__(self, passages: Passages, batch_size: int, pad_id: int, seed: int):
        self.passages, self.batch_size, self.pad_id = passages, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.passages), (self.batch_size,), generator=self.generator).tolist()
        ids, mask = pad_right([self.passages.ids[i] for i in picks], self.pad_id)
        return ids, mask, torch.from_numpy(self.passages.labels[picks])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K * count_k) per class ("balanced"): every class weighs the same in the loss, whatever its size."""
    counts = np.bincount(labels, minlength=num_classes)
    return len(labels) / (num_classes * np.maximum(counts, 1))


def classification_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    ids, mask, labels = batch
    return F.cross_entropy(model(ids, mask), labels, weight=weight)


@torch.no_grad()
def predict(model: GPTClassifier, sequences: list[list[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """Class probabilities (N, K) for every sequence of token ids (passages, or texts as scoring reads them)."""
    device = next(model.parameters()).device
    probs = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[i : i + batch_size], pad_id)
        probs.append(F.softmax(model(ids.to(device), mask.to(device)).float(), dim=-1).cpu().numpy())
    return np.concatenate(probs)


@dataclass
class FinetuneResult:
    out_dir: str
    best_dir: str
    labels: list[str]
    steps: int
    stopped_early: bool
    best_val_macro_f1: float
    best_val_accuracy: float
    train_passages: int
    val_passages: int
    train_seconds: float


def finetune(
    cfg: FinetuneConfig,
    pretrained_dir: str | Path,
    data_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune the pretrained GPT in `pretrained_dir` to predict `cfg.label_field` of each passage."""
    pretrained = load_pretrained(pretrained_dir)
    gpt, lm_meta = load_lm(pretrained.best_dir)
    if cfg.passage_tokens > gpt.cfg.block_size:
        raise InputError(f"finetune.passage_tokens={cfg.passage_tokens} exceeds the model's block_size={gpt.cfg.block_size}")
    tok = load_tokenizer(tokenized_dir)
    pad_id = tok.token_to_id(PAD)
    train, labels = make_passages(data_dir, "train", cfg.label_field, tok, cfg.passage_tokens, None)
    val, _ = make_passages(data_dir, "val", cfg.label_field, tok, cfg.passage_tokens, labels)
    torch.manual_seed(cfg.seed)
    model = GPTClassifier(gpt, len(labels))
    meta = {**lm_meta, "kind": "classifier", "labels": labels, "label_field": cfg.label_field,
            "passage_tokens": cfg.passage_tokens}
    meta["peft"] = apply_peft(model, cfg, trainable=("head",))
    meta["trainable_fraction"] = trainable_fraction(model)
    log.info("finetune: %s trains %.2f%% of the parameters", meta["peft"], 100 * meta["trainable_fraction"])
    val_eval = val.spread(cfg.eval_batches * cfg.batch_size)

    def evaluate(m: GPTClassifier) -> dict[str, float]:
        report = classification_report(val_eval.labels, predict(m, val_eval.ids, pad_id, cfg.batch_size), labels)
        return {"val_macro_f1": report["macro_f1"], "val_accuracy": report["accuracy"]}

    tags = {"gptcore.data_digest": pretrained.data_digest, "gptcore.tokenizer_digest": pretrained.tokenizer_digest}
    with stage_run(tracking, "finetune", tags=tags) as run:
        run.log_dataset(Path(data_dir) / "manifest.json", pretrained.data_digest)
        run.log_params({"finetune": asdict(cfg), "labels": labels, "train_passages": len(train), "val_passages": len(val)})
        run.log_metrics({"trainable_fraction": meta["trainable_fraction"]})
        counts = np.bincount(train.labels, minlength=len(labels))
        log.info("finetune: %d train / %d val passages of <= %d tokens; classes %s",
                 len(train), len(val), cfg.passage_tokens, dict(zip(labels, counts.tolist())))
        dist, loss = setup(cfg.device), classification_loss
        if cfg.class_weights:
            weights = balanced_class_weights(train.labels, len(labels))
            log.info("finetune: class weights %s", dict(zip(labels, np.round(weights, 3).tolist())))
            run.log_params({"class_weights": dict(zip(labels, weights.tolist()))})
            loss = partial(classification_loss, weight=torch.tensor(weights, dtype=torch.float32, device=dist.device))
        fitted = fit(
            "finetune", model, cfg, PassageBatches(train, cfg.batch_size, pad_id, cfg.seed), loss,
            evaluate, out_dir=out_dir, meta=meta, run=run, select=("val_macro_f1", "max"), dist=dist,
            resume=resume, patience=cfg.patience,
        )
        result = FinetuneResult(
            out_dir=str(out_dir), best_dir=fitted.best_dir, labels=labels, steps=fitted.steps,
            stopped_early=fitted.stopped_early, best_val_macro_f1=fitted.best_metrics["val_macro_f1"],
            best_val_accuracy=fitted.best_metrics["val_accuracy"], train_passages=len(train), val_passages=len(val),
            train_seconds=fitted.train_seconds,
        )
        write_json(Path(out_dir) / "result.json", asdict(result))
        run.log_metrics({"best_val_macro_f1": result.best_val_macro_f1, "best_val_accuracy": result.best_val_accuracy})
    return result


def load_finetuned(out_dir: str | Path) -> FinetuneResult:
    return FinetuneResult(**read_stage_output(out_dir, "result.json", "fine-tuned model", "finetune"))
