"""Chat supervised fine-tuning (SFT) of the pretrained GPT, and its evaluation against the base model.

The chat template's tokens (`gptcore.chat`) join the tokenizer and the model's vocabulary;
their embeddings start at the mean of the pretrained ones, a neutral point. Conversations are
packed into rows of block_size + 1 tokens and trained with loss on the assistant's tokens
only, through the training loop pretraining and classification share. Model selection and
early stopping use the validation loss on response tokens.

Evaluation scores held-out conversations with the base model (the pretrained GPT with the
same new tokens, i.e. SFT's starting point) and the fine-tuned one: response-token loss and
bits per byte of the responses' text; and writes side-by-side samples from fixed prompts.

Output: OUT/checkpoints/step_*/, OUT/best/ (weights + model.json), OUT/tokenizer.json (with the
chat tokens), OUT/result.json; evaluation: EVAL/sft_eval.json, EVAL/sft_samples.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptcore.chat import (Conversation, PackedRows, add_chat_tokens, pack, play_dialogues, read_chat_jsonl, render,
                          split_of)
from gptcore.checkpoint import load_lm
from gptcore.config import SFTConfig
from gptcore.distributed import setup
from gptcore.errors import InputError
from gptcore.fsutil import atomic_file, read_stage_output, write_json
from gptcore.model import GPT, padded_vocab_size
from gptcore.peft import apply_peft, trainable_fraction
from gptcore.pretrain import lm_loss, load_pretrained
from gptcore.tokenizer import PAD, load_tokenizer
from gptcore.tracking import Tracking, stage_run
from gptcore.train import fit

log = logging.getLogger("gptcore.sft")


def extend_vocab(gpt: GPT, vocab_size: int) -> GPT:
    """Grow the GPT's vocabulary to `vocab_size` ids (in place): new rows are the mean embedding."""
    old = gpt.cfg.vocab_size
    if vocab_size <= old:
        return gpt
    rows = padded_vocab_size(vocab_size)
    with torch.no_grad():
        for name in ("wte", "lm_head") if not gpt.cfg.tie_embeddings else ("wte",):
            module = getattr(gpt, name)
            weight = module.weight  # (V, C)
            if rows > weight.shape[0]:  # past the padding rows: a bigger table
                grown = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
                grown[: weight.shape[0]] = weight
                module.weight = torch.nn.Parameter(grown)
            module.weight[old:vocab_size] = module.weight[:old].mean(dim=0)
        if gpt.cfg.tie_embeddings:
            gpt.lm_head.weight = gpt.wte.weight
    gpt.cfg = dataclasses.replace(gpt.cfg, vocab_size=vocab_size)
    return gpt


def chat_model(pretrained_dir: str | Path, tokenized_dir: str | Path) -> tuple[GPT, dict[str, Any], Any, dict[str, int]]:
    """The pretrained GPT and its tokenizer, both with the chat tokens: SFT's starting point (the base)."""
    gpt, meta = load_lm(load_pretrained(pretrained_dir).best_dir)
    tok = load_tokenizer(tokenized_dir)
    chat_ids = add_chat_tokens(tok)
    extend_vocab(gpt, tok.get_vocab_size())
    return gpt, {**meta, "model": asdict(gpt.cfg)}, tok, chat_ids


def conversations(cfg: SFTConfig, data_dir: str | Path, split: str) -> list[Conversation]:
    """A split's conversations: of the chat file (split by hash), or the built-in plays' dialogues."""
    if cfg.data is None:
        return play_dialogues(data_dir, split)
    chosen = [c for c in read_chat_jsonl(cfg.data) if split_of(c, cfg.val_fraction, cfg.test_fraction) == split]
    if not chosen:
        raise InputError(f"{cfg.data}: no conversation falls in the {split} split; add more or raise sft.{split}_fraction")
    return chosen


def spread(items: list, n: int) -> list:
    """At most `n` items, evenly spread (not just the first ones)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, num=n).astype(np.int64)]


class RowBatches:
    """Random packed rows (with replacement), drawn with a generator of its own: (inputs, targets)."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int):
        self.rows, self.batch_size = rows, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator).numpy()
        return row_tensors(self.rows.ids[picks], self.rows.loss[picks])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def row_tensors(ids: np.ndarray, loss: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T + 1) ids and loss flags -> (N, T) inputs, (N, T) targets with -100 where no loss falls."""
    ids_t = torch.from_numpy(ids)
    targets = ids_t[:, 1:].masked_fill(~torch.from_numpy(loss[:, 1:]), -100)
    return ids_t[:, :-1], targets


@torch.no_grad()
def target_nats(model: GPT, ids: np.ndarray, loss: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-target NLL (nats) and target ids of every loss-carrying position of the rows, row by row."""
    device = next(model.parameters()).device
    nats, targets = [], []
    for i in range(0, len(ids), batch_size):
        x, y = row_tensors(ids[i : i + batch_size], loss[i : i + batch_size])
        logits, _ = model(x.to(device))
        keep = y != -100
        nll = F.cross_entropy(logits.float()[keep.to(device)], y[keep].to(device), reduction="none")
        nats.append(nll.cpu().numpy())
        targets.append(y[keep].numpy())
    return np.concatenate(nats).astype(np.float64), np.concatenate(targets)


@dataclass
class SFTResult:
    out_dir: str
    best_dir: str
    tokenizer_path: str
    steps: int
    stopped_early: bool
    best_val_response_loss: float
    train_conversations: int
    val_conversations: int
    train_rows: int
    truncated: int
    train_seconds: float


def sft(
    cfg: SFTConfig,
    pretrained_dir: str | Path,
    data_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
    resume: bool = False,
) -> SFTResult:
    """Fine-tune the pretrained GPT in `pretrained_dir` to answer in conversations (chat SFT)."""
    gpt, meta, tok, chat_ids = chat_model(pretrained_dir, tokenized_dir)
    pad_id = tok.token_to_id(PAD)
    block = gpt.cfg.block_size
    train, val = conversations(cfg, data_dir, "train"), spread(conversations(cfg, data_dir, "val"), cfg.eval_conversations)
    train_rows = pack([render(c, tok, chat_ids) for c in train], block, pad_id)
    val_rows = pack([render(c, tok, chat_ids) for c in val], block, pad_id)
    torch.manual_seed(cfg.seed)
    meta = {**meta, "sft": {"chat_tokens": chat_ids, "data": cfg.data or "plays"}, "peft": apply_peft(gpt, cfg)}
    meta["trainable_fraction"] = trainable_fraction(gpt)
    log.info("sft: %s fine-tuning trains %.2f%% of the parameters", cfg.method, 100 * meta["trainable_fraction"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))

    def evaluate(m: GPT) -> dict[str, float]:
        nats, _ = target_nats(m, val_rows.ids, val_rows.loss, cfg.batch_size)
        return {"val_response_loss": float(nats.mean())}

    tags = {"gptcore.data_digest": meta["data_digest"], "gptcore.tokenizer_digest": meta["tokenizer_digest"]}
    with stage_run(tracking, "sft", tags=tags) as run:
        run.log_params({"sft": asdict(cfg), "train_conversations": len(train), "val_conversations": len(val),
                        "train_rows": len(train_rows),
                        "chat_tokens": ", ".join(f"{t} {i}" for t, i in chat_ids.items())})
        run.log_metrics({"trainable_fraction": meta["trainable_fraction"]})
        loss_tokens = int(train_rows.loss.sum())
        log.info("sft: %d train conversations packed into %d rows of %d tokens (%.0f%% carry loss, %d cut to fit); "
                 "%d val conversations", len(train), len(train_rows), block + 1,
                 100 * loss_tokens / train_rows.loss.size, train_rows.truncated, len(val))
        fitted = fit("sft", gpt, cfg, RowBatches(train_rows, cfg.batch_size, cfg.seed), lm_loss, evaluate,
                     out_dir=out_dir, meta=meta, run=run, select=("val_response_loss", "min"), dist=setup(cfg.device),
                     resume=resume, patience=cfg.patience)
        result = SFTResult(
            out_dir=str(out_dir), best_dir=fitted.best_dir, tokenizer_path=str(out_dir / "tokenizer.json"),
            steps=fitted.steps, stopped_early=fitted.stopped_early,
            best_val_response_loss=fitted.best_metrics["val_response_loss"], train_conversations=len(train),
            val_conversations=len(val), train_rows=len(train_rows), truncated=train_rows.truncated,
            train_seconds=fitted.train_seconds,
        )
        write_json(out_dir / "result.json", asdict(result))
        run.log_metrics({"best_val_response_loss": result.best_val_response_loss})
        run.log_artifact(result.tokenizer_path)
    return result


def load_sft(out_dir: str | Path) -> SFTResult:
    return SFTResult(**read_stage_output(out_dir, "result.json", "chat model", "sft"))
