"""ONNX export of the language model with a KV cache, checked for parity with PyTorch.

LM graph (format 3, a fixed cache written in place): input_ids, position_ids (B, T),
logit_positions (B, K), past_key_<i>/past_value_<i> (B, H, W, D) -> logits (B, K, V) at the K
positions asked for (all T for scoring, the last one for generation, which then never computes
the vocabulary-wide head for the prompt), present_key_<i>/present_value_<i> (B, H, W, D): the
same buffer with each new token's keys and values written at its position, so a runtime binds
past and present to one buffer and a step writes T slots instead of copying the cache. A row
attends to its slots 0..position: rows of different lengths share a call without padding.

The growing cache of format 2 (past (B, H, P, D) + attention_mask (B, P + T) -> present
(B, H, P + T, D), concatenated each step) is still exported with `fixed_cache=False`, for the
benchmark that measures the change. Exporters specialise dimensions traced at size 0 or 1, so
the trace uses B = 2, T = 3, P or W = 8, K = 2; the parity check then runs ONNX Runtime on
whole windows and on greedy decoding. The fp32 graph must match: max |logit difference| within
export.parity_atol and identical greedy tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from gptcore.config import ExportConfig
from gptcore.errors import ParityError
from gptcore.export.package import log_export, torch_to_onnx, write_package
from gptcore.layout import TOKENIZER_FILE
from gptcore.model import GPT
from gptcore.results import ExportResult, load_pretrained, load_tokenized, load_tokenizer, read_tokens
from gptcore.runtime import load_model
from gptcore.tracking import Tracking
from gptcore.weights import load_lm

PARITY_WINDOWS = 8  # validation windows of block_size tokens that variants are compared on


class LMGraph(torch.nn.Module):
    """The GPT with its cache as flat named tensors: what the ONNX LM graph computes."""

    def __init__(self, gpt: GPT, fixed_cache: bool = True):
        super().__init__()
        self.gpt, self.fixed_cache = gpt, fixed_cache

    def forward(self, input_ids, position_ids, *rest):
        attention_mask, logit_positions, *past_flat = (None, *rest) if self.fixed_cache else rest
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.gpt.cfg.n_layer)]
        h, present = self.gpt.hidden_states(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, past=past, fixed_cache=self.fixed_cache
        )
        h = h.gather(1, logit_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, K, C)
        logits = self.gpt.lm_head(h)[..., : self.gpt.cfg.vocab_size]  # the tokenizer's ids only, not the padding
        return (logits, *[t for kv in present for t in kv])


def cache_names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def export_lm_graph(gpt: GPT, path: Path, opset: int, fixed_cache: bool = True) -> None:
    cfg = gpt.cfg
    B, T, P, H, D = 2, 3, 8, cfg.n_head, cfg.n_embd // cfg.n_head
    batch, seq, cached, total, kept = (
        torch.export.Dim(n) for n in ("batch", "sequence", "cache_sequence", "total_sequence", "logit_positions")
    )
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    logit_positions = torch.tensor([[1, 2], [0, 2]])
    past = [torch.zeros(B, H, P, D) for _ in range(2 * cfg.n_layer)]
    caches = tuple({0: batch, 2: cached} for _ in range(2 * cfg.n_layer))
    if fixed_cache:  # two rows at different positions in one buffer of P slots
        args = (ids, torch.tensor([[4, 5, 6], [1, 2, 3]]), logit_positions, *past)
        names = ["input_ids", "position_ids", "logit_positions"]
        rest = ({0: batch, 1: kept}, *caches)
    else:
        args = (
            ids,
            torch.arange(P, P + T).repeat(B, 1),
            torch.ones(B, P + T, dtype=torch.long),
            logit_positions,
            *past,
        )
        names = ["input_ids", "position_ids", "attention_mask", "logit_positions"]
        rest = ({0: batch, 1: total}, {0: batch, 1: kept}, *caches)
    # forward's arguments in order; torch.export names the varargs after them `rest`
    dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}, "rest": rest}
    torch_to_onnx(
        LMGraph(gpt, fixed_cache).eval(),
        args,
        path,
        [*names, *cache_names(cfg.n_layer, "past")],
        ["logits", *cache_names(cfg.n_layer, "present")],
        dynamic,
        opset,
    )


def lm_parity(gpt: GPT, package_dir: Path, variant: str, val_tokens: np.ndarray, cfg: ExportConfig) -> dict:
    """One variant against PyTorch fp32 on validation text: max |logit difference| and argmax
    agreement over PARITY_WINDOWS windows (teacher-forced: both read the same tokens), and
    greedy decoding (free-running, so one early difference changes the rest)."""
    onnx_lm = load_model(package_dir, device="cpu", variant=variant)
    T = gpt.cfg.block_size
    n = max(1, min(PARITY_WINDOWS, len(val_tokens) // T))
    windows = np.stack([val_tokens[i * T : (i + 1) * T] for i in range(n)]).astype(np.int64)  # (n, T)
    with torch.no_grad():
        ref = gpt(torch.from_numpy(windows))[0][..., : gpt.cfg.vocab_size].numpy()
    got = np.concatenate([onnx_lm.forward_logits(windows[i : i + 2]) for i in range(0, n, 2)])
    prompt = val_tokens[: min(16, T // 2)].astype(np.int64).tolist()
    with torch.no_grad():
        torch_ids = gpt.generate(torch.tensor([prompt]), cfg.parity_tokens, temperature=0.0)[0, len(prompt) :].tolist()
    onnx_ids = onnx_lm.generate_ids(prompt, max_new_tokens=cfg.parity_tokens, temperature=0.0, stop_at_eos=False)
    return {
        "max_abs_logit_diff": float(np.abs(got - ref).max()),
        "greedy_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "positions": int(windows.size),
        "greedy_tokens": cfg.parity_tokens,
        "greedy_tokens_equal": sum(a == b for a, b in zip(torch_ids, onnx_ids)),
        "provider": onnx_lm.provider,
    }


def check_lm_parity(gpt: GPT, val_tokens: np.ndarray, cfg: ExportConfig, variant: str, package_dir: Path) -> dict:
    """A variant's parity figures; the fp32 graph must match: logits within parity_atol, every greedy token equal."""
    parity = lm_parity(gpt, package_dir, variant, val_tokens, cfg)
    if variant == "fp32" and (
        parity["max_abs_logit_diff"] > cfg.parity_atol or parity["greedy_tokens_equal"] != cfg.parity_tokens
    ):
        raise ParityError(
            f"LM ONNX parity failed: max |logit diff| {parity['max_abs_logit_diff']:.2e} (limit "
            f"{cfg.parity_atol:.0e}), greedy tokens equal {parity['greedy_tokens_equal']}/{cfg.parity_tokens}"
        )
    return parity


def export_lm_onnx(
    cfg: ExportConfig,
    pretrained_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
) -> ExportResult:
    """Export the pretrained LM with its KV cache to an ONNX package in `out_dir`, parity-checked."""
    gpt, meta = load_lm(load_pretrained(pretrained_dir).best_dir)
    tok = load_tokenizer(tokenized_dir)
    val_tokens = np.asarray(read_tokens(load_tokenized(tokenized_dir), "val"))
    result = write_package(
        Path(out_dir),
        "lm",
        lambda path: export_lm_graph(gpt, path, cfg.opset),
        gpt,
        tok,
        Path(tokenized_dir) / TOKENIZER_FILE,
        meta,
        cfg,
        functools.partial(check_lm_parity, gpt, val_tokens, cfg),
    )
    log_export(tracking, "export_lm", result, meta)
    return result
