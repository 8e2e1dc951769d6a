"""Fine-tuning for sequence classification: the pretrained GPT plus a head over the last token.

Labelled passages (`gptcore.data.passages`) come from the train split only, model selection
and early stopping use the val split, and the test split is left to evaluation, so no passage
of a test scene is ever trained on.

Output: OUT/checkpoints/step_*/, OUT/best/ (highest validation macro-F1), OUT/result.json.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gptcore.config import FinetuneConfig
from gptcore.data.passages import make_passages
from gptcore.errors import InputError
from gptcore.fsutil import write_json
from gptcore.layout import INGEST_MANIFEST, PAD, RESULT_FILE
from gptcore.metrics import classification_report
from gptcore.model import GPTClassifier, classify
from gptcore.peft import apply_peft, trainable_fraction
from gptcore.results import FinetuneResult, load_pretrained, load_tokenizer
from gptcore.tracking import Tracking, stage_run
from gptcore.train.batches import PassageBatches
from gptcore.train.distributed import setup
from gptcore.train.loop import fit
from gptcore.weights import load_lm

log = logging.getLogger("gptcore.finetune")


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K * count_k) per class ("balanced"): every class weighs the same in the loss, whatever its size."""
    counts = np.bincount(labels, minlength=num_classes)
    return len(labels) / (num_classes * np.maximum(counts, 1))


def classification_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], weight: torch.Tensor | None = None
) -> torch.Tensor:
    ids, mask, labels = batch
    return F.cross_entropy(model(ids, mask), labels, weight=weight)


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
        raise InputError(
            f"finetune.passage_tokens={cfg.passage_tokens} exceeds the model's block_size={gpt.cfg.block_size}"
        )
    tok = load_tokenizer(tokenized_dir)
    pad_id = tok.token_to_id(PAD)
    train, labels = make_passages(data_dir, "train", cfg.label_field, tok, cfg.passage_tokens, None)
    val, _ = make_passages(data_dir, "val", cfg.label_field, tok, cfg.passage_tokens, labels)
    torch.manual_seed(cfg.seed)
    model = GPTClassifier(gpt, len(labels))
    meta = {
        **lm_meta,
        "kind": "classifier",
        "labels": labels,
        "label_field": cfg.label_field,
        "passage_tokens": cfg.passage_tokens,
    }
    meta["peft"] = apply_peft(model, cfg, trainable=("head",))
    meta["trainable_fraction"] = trainable_fraction(model)
    log.info("finetune: %s trains %.2f%% of the parameters", meta["peft"], 100 * meta["trainable_fraction"])
    val_eval = val.spread(cfg.eval_batches * cfg.batch_size)

    def evaluate(m: GPTClassifier) -> dict[str, float]:
        report = classification_report(val_eval.labels, classify(m, val_eval.ids, pad_id, cfg.batch_size), labels)
        return {"val_macro_f1": report["macro_f1"], "val_accuracy": report["accuracy"]}

    tags = {"gptcore.data_digest": pretrained.data_digest, "gptcore.tokenizer_digest": pretrained.tokenizer_digest}
    with stage_run(tracking, "finetune", tags=tags, system_metrics=True) as run:
        run.log_dataset(Path(data_dir) / INGEST_MANIFEST, pretrained.data_digest)
        run.log_params(
            {"finetune": asdict(cfg), "labels": labels, "train_passages": len(train), "val_passages": len(val)}
        )
        run.log_metrics({"train/trainable_fraction": meta["trainable_fraction"]})
        counts = np.bincount(train.labels, minlength=len(labels))
        log.info(
            "finetune: %d train / %d val passages of <= %d tokens; classes %s",
            len(train),
            len(val),
            cfg.passage_tokens,
            dict(zip(labels, counts.tolist())),
        )
        dist, loss = setup(cfg.device), classification_loss
        if cfg.class_weights:
            weights = balanced_class_weights(train.labels, len(labels))
            log.info("finetune: class weights %s", dict(zip(labels, np.round(weights, 3).tolist())))
            run.log_params({"class_weights": dict(zip(labels, weights.tolist()))})
            loss = partial(classification_loss, weight=torch.tensor(weights, dtype=torch.float32, device=dist.device))
        fitted = fit(
            "finetune",
            model,
            cfg,
            PassageBatches(train, cfg.batch_size, pad_id, cfg.seed),
            loss,
            evaluate,
            out_dir=out_dir,
            meta=meta,
            run=run,
            select=("val_macro_f1", "max"),
            dist=dist,
            resume=resume,
            patience=cfg.patience,
        )
        result = FinetuneResult(
            out_dir=str(out_dir),
            best_dir=fitted.best_dir,
            labels=labels,
            steps=fitted.steps,
            stopped_early=fitted.stopped_early,
            best_val_macro_f1=fitted.best_metrics["val_macro_f1"],
            best_val_accuracy=fitted.best_metrics["val_accuracy"],
            train_passages=len(train),
            val_passages=len(val),
            train_seconds=fitted.train_seconds,
        )
        write_json(Path(out_dir) / RESULT_FILE, asdict(result))
        run.log_metrics({"best/val_macro_f1": result.best_val_macro_f1, "best/val_accuracy": result.best_val_accuracy})
    return result
