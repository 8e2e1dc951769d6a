"""ONNX export of the chat model: the LM graph with its KV cache, in a package that carries the chat template.

The fine-tuned chat model is a GPT like the pretrained one, with the template's tokens in its
vocabulary, so it exports through the LM's graph and parity check (`gptcore.export.lm`), on
held-out conversations rendered in the template (template tokens included) rather than on plain
text. The package's kind is `chat`; its description names the template's token ids and carries
the template itself (`gptcore.runtime.template`), and `tokenizer_config.json` carries it as
`transformers` reads it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from gptcore.config import ExportConfig, SFTConfig
from gptcore.data.chat import conversations, spread
from gptcore.export.lm import PARITY_WINDOWS, check_lm_parity, export_lm_graph
from gptcore.export.package import log_export, write_package
from gptcore.results import ExportResult, load_sft, load_tokenizer
from gptcore.runtime.template import add_chat_tokens, render
from gptcore.tracking import Tracking
from gptcore.weights import load_lm


def export_chat_onnx(
    cfg: ExportConfig,
    sft_cfg: SFTConfig,
    sft_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
) -> ExportResult:
    """Export the chat model in `sft_dir` to an ONNX package in `out_dir`, parity-checked on held-out conversations."""
    chat = load_sft(sft_dir)
    gpt, meta = load_lm(chat.best_dir)
    tok = load_tokenizer(chat.tokenizer_path)
    chat_ids = add_chat_tokens(tok)
    held_out = spread(conversations(sft_cfg, data_dir, "val"), PARITY_WINDOWS * 4)
    tokens = np.asarray([i for c in held_out for i in render(c, tok, chat_ids).ids], dtype=np.int64)
    result = write_package(
        Path(out_dir),
        "chat",
        lambda path: export_lm_graph(gpt, path, cfg.opset),
        gpt,
        tok,
        Path(chat.tokenizer_path),
        meta,
        cfg,
        functools.partial(check_lm_parity, gpt, tokens, cfg),
    )
    log_export(tracking, "export_chat", result, meta)
    return result
