"""ONNX export of the classifier (input_ids, attention_mask -> logits), checked for parity with PyTorch
on validation passages: the fp32 graph must give logits within export.parity_atol and the same
prediction on every passage.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from gptcore.config import ExportConfig
from gptcore.data.passages import make_passages
from gptcore.errors import ParityError
from gptcore.export.package import log_export, torch_to_onnx, write_package
from gptcore.layout import PAD, TOKENIZER_FILE
from gptcore.model import GPTClassifier, pad_right
from gptcore.results import ExportResult, load_finetuned, load_tokenizer
from gptcore.runtime import load_model
from gptcore.tracking import Tracking
from gptcore.weights import checkpoint_source, load_classifier


def export_classifier_graph(model: GPTClassifier, path: Path, opset: int) -> None:
    args = (torch.randint(0, model.gpt.cfg.vocab_size, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch_to_onnx(
        model.eval(),
        args,
        path,
        ["input_ids", "attention_mask"],
        ["logits"],
        {"idx": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        opset,
    )


def classifier_parity(
    model: GPTClassifier, package_dir: Path, variant: str, passages: list[list[int]], pad_id: int
) -> dict:
    onnx_cls = load_model(package_dir, device="cpu", variant=variant)
    ids, mask = pad_right(passages, pad_id)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = onnx_cls.forward_logits(ids.numpy(), mask.numpy())
    same = int((got.argmax(1) == ref.argmax(1)).sum())
    return {
        "max_abs_logit_diff": float(np.abs(got - ref).max()),
        "inputs": len(passages),
        "predictions_equal": same,
        "greedy_agreement": same / len(passages),
        "provider": onnx_cls.provider,
    }


def check_classifier_parity(
    model: GPTClassifier, passages: list[list[int]], pad_id: int, cfg: ExportConfig, variant: str, package_dir: Path
) -> dict:
    parity = classifier_parity(model, package_dir, variant, passages, pad_id)
    if variant == "fp32" and (
        parity["max_abs_logit_diff"] > cfg.parity_atol or parity["predictions_equal"] != len(passages)
    ):
        raise ParityError(
            f"classifier ONNX parity failed: max |logit diff| {parity['max_abs_logit_diff']:.2e} "
            f"(limit {cfg.parity_atol:.0e}), predictions equal {parity['predictions_equal']}/{len(passages)}"
        )
    return parity


def export_classifier_onnx(
    cfg: ExportConfig,
    finetuned_dir: str | Path,
    data_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
) -> ExportResult:
    """Export the fine-tuned classifier to an ONNX package in `out_dir`, parity-checked on val passages."""
    best_dir = load_finetuned(finetuned_dir).best_dir
    model, meta = load_classifier(best_dir)
    meta["checkpoint"] = checkpoint_source(best_dir)
    tok = load_tokenizer(tokenized_dir)
    val, _ = make_passages(data_dir, "val", meta["label_field"], tok, meta["passage_tokens"], meta["labels"])
    passages, pad_id = val.spread(32).ids, tok.token_to_id(PAD)
    result = write_package(
        Path(out_dir),
        "classifier",
        lambda path: export_classifier_graph(model, path, cfg.opset),
        model.gpt,
        tok,
        Path(tokenized_dir) / TOKENIZER_FILE,
        meta,
        cfg,
        functools.partial(check_classifier_parity, model, passages, pad_id, cfg),
    )
    log_export(tracking, "export_classifier", result, meta)
    return result
