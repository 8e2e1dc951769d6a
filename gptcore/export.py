"""ONNX export of the language model (with a KV cache) and of the classifier, checked for parity.

A model package is a directory that `gptcore.runtime` serves without torch:
    model.onnx            the graph and weights
    tokenizer.json        the tokenizer the model was trained with
    gptcore_model.json    kind, shapes, special token ids, labels, digests, parity figures, and (classifier)
                          the checkpoint it came from, which the registry attaches to the version

LM graph: input_ids, position_ids (B, T), attention_mask (B, P + T), past_key_<i>/past_value_<i>
(B, H, P, D) -> logits (B, T, V), present_key_<i>/present_value_<i> (B, H, P + T, D). Exporters
specialise dimensions traced at size 0 or 1, so the trace uses B = 2, T = 3, P = 4; the parity
check then runs ONNX Runtime on the empty-cache first step and on single-token decode steps.
The package is written only when parity holds (max |logit difference| and identical greedy
tokens); otherwise the stage raises `ParityError` and leaves any earlier package in place.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptcore.checkpoint import checkpoint_source, load_classifier, load_lm
from gptcore.config import ExportConfig
from gptcore.errors import ParityError
from gptcore.finetune import load_finetuned, make_passages, pad_right
from gptcore.fsutil import atomic_dir, read_json, write_json
from gptcore.model import GPT, GPTClassifier
from gptcore.pretrain import load_pretrained
from gptcore.tokenizer import EOT, PAD, load_tokenized, load_tokenizer, read_tokens
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.export")

FORMAT_VERSION = 1


class LMGraph(torch.nn.Module):
    """The GPT with its cache as flat named tensors: what the ONNX LM graph computes."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, position_ids, attention_mask, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.gpt.cfg.n_layer)]
        h, present = self.gpt.hidden_states(input_ids, position_ids=position_ids, attention_mask=attention_mask, past=past)
        logits = self.gpt.lm_head(h)[..., : self.gpt.cfg.vocab_size]  # the tokenizer's ids only, not the padding
        return (logits, *[t for kv in present for t in kv])


def cache_names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: dict, opset: int) -> None:
    # One self-contained file unless the weights pass protobuf's 2 GB limit (then model.onnx.data beside it).
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), quiet_logger("torch.onnx._internal.exporter._registration"):
        # The exporter notes that axes sharing one constraint share a name, and that torchvision
        # (which we do not use) is missing: neither says anything about our graph.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=opset, verbose=False,
                          external_data=weight_bytes > 1 << 30)


@contextlib.contextmanager
def quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_lm_graph(gpt: GPT, path: Path, opset: int) -> None:
    cfg = gpt.cfg
    B, T, P, H, D = 2, 3, 4, cfg.n_head, cfg.n_embd // cfg.n_head
    args = (
        torch.randint(0, cfg.vocab_size, (B, T)),
        torch.arange(P, P + T).repeat(B, 1),
        torch.ones(B, P + T, dtype=torch.long),
        *[torch.zeros(B, H, P, D) for _ in range(2 * cfg.n_layer)],
    )
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "past_flat": tuple({0: batch, 2: past} for _ in range(2 * cfg.n_layer))}
    _export(LMGraph(gpt).eval(), args, path, ["input_ids", "position_ids", "attention_mask", *cache_names(cfg.n_layer, "past")],
            ["logits", *cache_names(cfg.n_layer, "present")], dynamic, opset)


def export_classifier_graph(model: GPTClassifier, path: Path, opset: int) -> None:
    args = (torch.randint(0, model.gpt.cfg.vocab_size, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    _export(model.eval(), args, path, ["input_ids", "attention_mask"], ["logits"],
            {"idx": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, opset)


def package_meta(kind: str, gpt: GPT, tok, model_meta: dict, parity: dict) -> dict:
    cfg = gpt.cfg
    return {
        "format_version": FORMAT_VERSION, "kind": kind, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head, "vocab_size": cfg.vocab_size,
        "eos_token_id": tok.token_to_id(EOT), "pad_token_id": tok.token_to_id(PAD),
        "labels": model_meta.get("labels", []), "model": model_meta["model"],
        "data_digest": model_meta["data_digest"], "tokenizer_digest": model_meta["tokenizer_digest"],
        "tokens_digest": model_meta.get("tokens_digest"), "parity": parity,
        "checkpoint": model_meta.get("checkpoint"),
    }


def check_lm_parity(gpt: GPT, package_dir: Path, val_tokens: np.ndarray, cfg: ExportConfig) -> dict:
    """Full-window logits and greedy decoding through ONNX Runtime vs PyTorch, on validation text."""
    from gptcore.runtime import load_model

    onnx_lm = load_model(package_dir, device="cpu")
    T = gpt.cfg.block_size
    windows = np.stack([val_tokens[i * T : (i + 1) * T] for i in range(2)]).astype(np.int64)  # (2, T)
    with torch.no_grad():
        ref = gpt(torch.from_numpy(windows))[0][..., : gpt.cfg.vocab_size].numpy()
    got = onnx_lm.forward_logits(windows)
    max_diff = float(np.abs(got - ref).max())
    prompt = val_tokens[: min(16, T // 2)].astype(np.int64).tolist()
    with torch.no_grad():
        torch_ids = gpt.generate(torch.tensor([prompt]), cfg.parity_tokens, temperature=0.0)[0, len(prompt):].tolist()
    onnx_ids = onnx_lm.generate_ids(prompt, max_new_tokens=cfg.parity_tokens, temperature=0.0, stop_at_eos=False)
    agree = sum(a == b for a, b in zip(torch_ids, onnx_ids))
    parity = {"max_abs_logit_diff": max_diff, "greedy_tokens": cfg.parity_tokens, "greedy_tokens_equal": agree,
              "provider": onnx_lm.provider}
    if max_diff > cfg.parity_atol or onnx_ids != torch_ids:
        raise ParityError(f"LM ONNX parity failed: max |logit diff| {max_diff:.2e} (limit {cfg.parity_atol:.0e}), "
                          f"greedy tokens equal {agree}/{cfg.parity_tokens}")
    return parity


def check_classifier_parity(model: GPTClassifier, package_dir: Path, passages: list[list[int]], pad_id: int,
                            cfg: ExportConfig) -> dict:
    from gptcore.runtime import load_model

    onnx_cls = load_model(package_dir, device="cpu")
    ids, mask = pad_right(passages, pad_id)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = onnx_cls.forward_logits(ids.numpy(), mask.numpy())
    max_diff = float(np.abs(got - ref).max())
    same = int((got.argmax(1) == ref.argmax(1)).sum())
    parity = {"max_abs_logit_diff": max_diff, "inputs": len(passages), "predictions_equal": same,
              "provider": onnx_cls.provider}
    if max_diff > cfg.parity_atol or same != len(passages):
        raise ParityError(f"classifier ONNX parity failed: max |logit diff| {max_diff:.2e} "
                          f"(limit {cfg.parity_atol:.0e}), predictions equal {same}/{len(passages)}")
    return parity


@dataclass
class ExportResult:
    package_dir: str
    kind: str
    onnx_bytes: int
    parity: dict


def _finish(kind: str, package_dir: Path, gpt: GPT, tok, model_meta: dict, parity: dict, tmp: Path) -> ExportResult:
    """Rewrite the package description with the parity figures (the check itself needed one already)."""
    write_json(tmp / "gptcore_model.json", package_meta(kind, gpt, tok, model_meta, parity))
    result = ExportResult(str(package_dir), kind, (tmp / "model.onnx").stat().st_size, parity)
    log.info("export: %s -> %s (%.1f MB); parity %s", kind, package_dir, result.onnx_bytes / 1e6, parity)
    return result


def _log_export(tracking: Tracking | None, name: str, result: ExportResult, model_meta: dict) -> None:
    with stage_run(tracking, name, tags={"gptcore.data_digest": model_meta["data_digest"]}) as run:
        run.log_metrics({k: float(v) for k, v in result.parity.items() if isinstance(v, (int, float))}
                        | {"onnx_bytes": result.onnx_bytes})
        run.log_artifact(Path(result.package_dir) / "gptcore_model.json")  # the graph itself goes to the registry


def export_lm_onnx(cfg: ExportConfig, pretrained_dir: str | Path, tokenized_dir: str | Path, out_dir: str | Path,
                   tracking: Tracking | None = None) -> ExportResult:
    """Export the pretrained LM with its KV cache to an ONNX package in `out_dir`, parity-checked."""
    gpt, meta = load_lm(load_pretrained(pretrained_dir).best_dir)
    tok = load_tokenizer(tokenized_dir)
    val_tokens = np.asarray(read_tokens(load_tokenized(tokenized_dir), "val"))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        export_lm_graph(gpt, tmp / "model.onnx", cfg.opset)
        shutil.copyfile(Path(tokenized_dir) / "tokenizer.json", tmp / "tokenizer.json")
        write_json(tmp / "gptcore_model.json", package_meta("lm", gpt, tok, meta, {}))
        parity = check_lm_parity(gpt, tmp, val_tokens, cfg)
        result = _finish("lm", out_dir, gpt, tok, meta, parity, tmp)
    _log_export(tracking, "export_lm", result, meta)
    return result


def export_classifier_onnx(cfg: ExportConfig, finetuned_dir: str | Path, data_dir: str | Path,
                           tokenized_dir: str | Path, out_dir: str | Path, tracking: Tracking | None = None) -> ExportResult:
    """Export the fine-tuned classifier to an ONNX package in `out_dir`, parity-checked on val passages."""
    best_dir = load_finetuned(finetuned_dir).best_dir
    model, meta = load_classifier(best_dir)
    meta["checkpoint"] = checkpoint_source(best_dir)
    tok = load_tokenizer(tokenized_dir)
    val, _ = make_passages(data_dir, "val", meta["label_field"], tok, meta["passage_tokens"], meta["labels"])
    passages = val.spread(32).ids
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        export_classifier_graph(model, tmp / "model.onnx", cfg.opset)
        shutil.copyfile(Path(tokenized_dir) / "tokenizer.json", tmp / "tokenizer.json")
        write_json(tmp / "gptcore_model.json", package_meta("classifier", model.gpt, tok, meta, {}))
        parity = check_classifier_parity(model, tmp, passages, tok.token_to_id(PAD), cfg)
        result = _finish("classifier", out_dir, model.gpt, tok, meta, parity, tmp)
    _log_export(tracking, "export_classifier", result, meta)
    return result


def load_export(package_dir: str | Path) -> dict:
    return read_json(Path(package_dir) / "gptcore_model.json")
