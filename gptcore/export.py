"""ONNX export of the language model (with a KV cache) and of the classifier, checked for parity.

A model package is a directory that `gptcore.runtime` serves without torch:
    model.onnx            the graph and weights, fused for ONNX Runtime (`gptcore.onnx_variants`)
    model.fp16.onnx       the fp16 variant, model.int8.onnx the int8 variant (where they pass parity)
    tokenizer.json        the tokenizer the model was trained with
    gptcore_model.json    kind, shapes, special token ids, labels, digests, each variant's parity figures,
                          the fused-op counts, and (classifier) the checkpoint it came from, which the
                          registry attaches to the version

LM graph: input_ids, position_ids (B, T), attention_mask (B, P + T), logit_positions (B, K),
past_key_<i>/past_value_<i> (B, H, P, D) -> logits (B, K, V) at the K positions asked for (all T
for scoring, the last one for generation, which then never computes the vocabulary-wide head
for the prompt), present_key_<i>/present_value_<i> (B, H, P + T, D). Exporters specialise
dimensions traced at size 0 or 1, so the trace uses B = 2, T = 3, P = 4, K = 2; the parity check
then runs ONNX Runtime on the empty-cache first step and on single-token decode steps.
The package is written only when the fp32 graph's parity holds (max |logit difference| and
identical greedy tokens); otherwise the stage raises `ParityError` and leaves any earlier
package in place. A precision variant is kept only when its argmax agrees with PyTorch's on
the configured share of validation positions; one that does not is left out, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
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
from gptcore.onnx_variants import VARIANT_FILES, build_variant, fused_op_counts, optimize_graph
from gptcore.pretrain import load_pretrained
from gptcore.tokenizer import EOT, PAD, load_tokenized, load_tokenizer, read_tokens
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.export")

FORMAT_VERSION = 2
PARITY_WINDOWS = 8  # validation windows of block_size tokens that variants are compared on


class LMGraph(torch.nn.Module):
    """The GPT with its cache as flat named tensors: what the ONNX LM graph computes."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, position_ids, attention_mask, logit_positions, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.gpt.cfg.n_layer)]
        h, present = self.gpt.hidden_states(input_ids, position_ids=position_ids, attention_mask=attention_mask, past=past)
        h = h.gather(1, logit_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, K, C)
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
        torch.tensor([[1, 2], [0, 2]]),
        *[torch.zeros(B, H, P, D) for _ in range(2 * cfg.n_layer)],
    )
    batch, seq, past, total, kept = (torch.export.Dim(n) for n in
                                     ("batch", "sequence", "past_sequence", "total_sequence", "logit_positions"))
    dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "logit_positions": {0: batch, 1: kept}, "past_flat": tuple({0: batch, 2: past} for _ in range(2 * cfg.n_layer))}
    _export(LMGraph(gpt).eval(), args, path,
            ["input_ids", "position_ids", "attention_mask", "logit_positions", *cache_names(cfg.n_layer, "past")],
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


def lm_parity(gpt: GPT, package_dir: Path, variant: str, val_tokens: np.ndarray, cfg: ExportConfig) -> dict:
    """One variant against PyTorch fp32 on validation text: max |logit difference| and argmax
    agreement over PARITY_WINDOWS windows (teacher-forced: both read the same tokens), and
    greedy decoding (free-running, so one early difference changes the rest)."""
    from gptcore.runtime import load_model

    onnx_lm = load_model(package_dir, device="cpu", variant=variant)
    T = gpt.cfg.block_size
    n = max(1, min(PARITY_WINDOWS, len(val_tokens) // T))
    windows = np.stack([val_tokens[i * T : (i + 1) * T] for i in range(n)]).astype(np.int64)  # (n, T)
    with torch.no_grad():
        ref = gpt(torch.from_numpy(windows))[0][..., : gpt.cfg.vocab_size].numpy()
    got = np.concatenate([onnx_lm.forward_logits(windows[i : i + 2]) for i in range(0, n, 2)])
    prompt = val_tokens[: min(16, T // 2)].astype(np.int64).tolist()
    with torch.no_grad():
        torch_ids = gpt.generate(torch.tensor([prompt]), cfg.parity_tokens, temperature=0.0)[0, len(prompt):].tolist()
    onnx_ids = onnx_lm.generate_ids(prompt, max_new_tokens=cfg.parity_tokens, temperature=0.0, stop_at_eos=False)
    return {"max_abs_logit_diff": float(np.abs(got - ref).max()),
            "greedy_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "positions": int(windows.size),
            "greedy_tokens": cfg.parity_tokens, "greedy_tokens_equal": sum(a == b for a, b in zip(torch_ids, onnx_ids)),
            "provider": onnx_lm.provider}


def check_lm_parity(gpt: GPT, val_tokens: np.ndarray, cfg: ExportConfig, variant: str, package_dir: Path) -> dict:
    """A variant's parity figures; the fp32 graph must match: logits within parity_atol, every greedy token identical."""
    parity = lm_parity(gpt, package_dir, variant, val_tokens, cfg)
    if variant == "fp32" and (parity["max_abs_logit_diff"] > cfg.parity_atol
                              or parity["greedy_tokens_equal"] != cfg.parity_tokens):
        raise ParityError(f"LM ONNX parity failed: max |logit diff| {parity['max_abs_logit_diff']:.2e} (limit "
                          f"{cfg.parity_atol:.0e}), greedy tokens equal {parity['greedy_tokens_equal']}/{cfg.parity_tokens}")
    return parity


def classifier_parity(model: GPTClassifier, package_dir: Path, variant: str, passages: list[list[int]],
                      pad_id: int) -> dict:
    from gptcore.runtime import load_model

    onnx_cls = load_model(package_dir, device="cpu", variant=variant)
    ids, mask = pad_right(passages, pad_id)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = onnx_cls.forward_logits(ids.numpy(), mask.numpy())
    same = int((got.argmax(1) == ref.argmax(1)).sum())
    return {"max_abs_logit_diff": float(np.abs(got - ref).max()), "inputs": len(passages), "predictions_equal": same,
            "greedy_agreement": same / len(passages), "provider": onnx_cls.provider}


def check_classifier_parity(model: GPTClassifier, passages: list[list[int]], pad_id: int, cfg: ExportConfig,
                            variant: str, package_dir: Path) -> dict:
    parity = classifier_parity(model, package_dir, variant, passages, pad_id)
    if variant == "fp32" and (parity["max_abs_logit_diff"] > cfg.parity_atol
                              or parity["predictions_equal"] != len(passages)):
        raise ParityError(f"classifier ONNX parity failed: max |logit diff| {parity['max_abs_logit_diff']:.2e} "
                          f"(limit {cfg.parity_atol:.0e}), predictions equal {parity['predictions_equal']}/{len(passages)}")
    return parity


def add_variants(cfg: ExportConfig, tmp: Path, meta: dict, parity_of) -> dict:
    """Build each configured variant beside model.onnx and keep those whose agreement reaches its floor.

    `parity_of(variant, package_dir)` measures a variant against PyTorch; returns {variant: {file, parity}}.
    """
    variants = {"fp32": {"file": VARIANT_FILES["fp32"], "parity": meta["parity"]}}
    for variant in cfg.variants:
        path = build_variant(variant, tmp / VARIANT_FILES["fp32"], tmp)
        write_json(tmp / "gptcore_model.json", meta | {"variants": variants | {variant: {"file": path.name}}})
        parity = parity_of(variant, tmp)
        floor = getattr(cfg, f"min_agreement_{variant}")
        parity["min_agreement"] = floor
        if parity["greedy_agreement"] >= floor:
            variants[variant] = {"file": path.name, "parity": parity}
        else:
            log.warning("export: %s variant left out: argmax agreement %.4f < %.2f (export.min_agreement_%s)",
                        variant, parity["greedy_agreement"], floor, variant)
            path.unlink()
            meta.setdefault("variants_left_out", {})[variant] = parity
    return variants


def write_graph(export_graph, tmp: Path, cfg: ExportConfig) -> dict:
    """Export to model.onnx, fused unless export.optimize is off; returns the fusions applied and fused-op counts."""
    target = tmp / VARIANT_FILES["fp32"]
    if not cfg.optimize:
        export_graph(target)
        return {"fusions": {}, "fused_ops": fused_op_counts(target)}
    raw = tmp / "graph.unfused.onnx"
    export_graph(raw)
    fusions = optimize_graph(raw, target)
    raw.unlink()
    return {"fusions": fusions, "fused_ops": fused_op_counts(target)}


@dataclass
class ExportResult:
    package_dir: str
    kind: str
    onnx_bytes: int
    parity: dict


def write_package(out_dir: Path, kind: str, export_graph, gpt: GPT, tok, tokenizer_json: Path, model_meta: dict,
                  cfg: ExportConfig, parity_of) -> ExportResult:
    """Export, fuse, check fp32 parity, add the variants, and describe it all: the package in `out_dir`.

    `export_graph(path)` writes the unfused graph; `parity_of(variant, package_dir)` measures a
    variant against PyTorch (and raises for an fp32 graph that does not match).
    """
    with atomic_dir(out_dir) as tmp:
        graph = write_graph(export_graph, tmp, cfg)
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        write_json(tmp / "gptcore_model.json", package_meta(kind, gpt, tok, model_meta, {}))
        meta = package_meta(kind, gpt, tok, model_meta, parity_of("fp32", tmp)) | graph
        meta["variants"] = add_variants(cfg, tmp, meta, parity_of)
        write_json(tmp / "gptcore_model.json", meta)
        result = ExportResult(str(out_dir), kind, (tmp / "model.onnx").stat().st_size, meta["parity"])
    log.info("export: %s -> %s (%.1f MB); fused ops %s; variants %s; parity %s", kind, out_dir,
             result.onnx_bytes / 1e6, graph["fused_ops"], ", ".join(meta["variants"]), meta["parity"])
    return result


def _log_export(tracking: Tracking | None, name: str, result: ExportResult, model_meta: dict) -> None:
    meta = load_export(result.package_dir)
    with stage_run(tracking, name, tags={"gptcore.data_digest": model_meta["data_digest"]}) as run:
        figures = {f"{variant}_{k}": float(v) for variant, entry in meta["variants"].items()
                   for k, v in entry["parity"].items() if isinstance(v, (int, float))}
        run.log_metrics(figures | {f"fused_{k}": v for k, v in meta["fused_ops"].items()}
                        | {"onnx_bytes": result.onnx_bytes})
        run.log_params({"variants": ",".join(meta["variants"]), "optimized": bool(meta["fusions"])})
        run.log_artifact(Path(result.package_dir) / "gptcore_model.json")  # the graphs themselves go to the registry


def export_lm_onnx(cfg: ExportConfig, pretrained_dir: str | Path, tokenized_dir: str | Path, out_dir: str | Path,
                   tracking: Tracking | None = None) -> ExportResult:
    """Export the pretrained LM with its KV cache to an ONNX package in `out_dir`, parity-checked."""
    gpt, meta = load_lm(load_pretrained(pretrained_dir).best_dir)
    tok = load_tokenizer(tokenized_dir)
    val_tokens = np.asarray(read_tokens(load_tokenized(tokenized_dir), "val"))
    result = write_package(Path(out_dir), "lm", lambda path: export_lm_graph(gpt, path, cfg.opset), gpt, tok,
                           Path(tokenized_dir) / "tokenizer.json", meta, cfg,
                           functools.partial(check_lm_parity, gpt, val_tokens, cfg))
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
    passages, pad_id = val.spread(32).ids, tok.token_to_id(PAD)
    result = write_package(Path(out_dir), "classifier", lambda path: export_classifier_graph(model, path, cfg.opset),
                           model.gpt, tok, Path(tokenized_dir) / "tokenizer.json", meta, cfg,
                           functools.partial(check_classifier_parity, model, passages, pad_id, cfg))
    _log_export(tracking, "export_classifier", result, meta)
    return result


def load_export(package_dir: str | Path) -> dict:
    return read_json(Path(package_dir) / "gptcore_model.json")
