"""Chat supervised fine-tuning (SFT) of the pretrained GPT, and its evaluation against the base model.

The chat template's tokens (`gptcore.runtime.template`) join the tokenizer and the model's vocabulary;
their embeddings start at the mean of the pretrained ones, a neutral point. Conversations are
packed into rows of block_size + 1 tokens and trained with loss on the assistant's tokens
only, through the training loop pretraining and classification share. Model selection and
early stopping use the validation loss on response tokens. `gptcore.eval.chat` then scores the
fine-tuned model beside its base on held-out conversations.

Output: OUT/checkpoints/step_*/, OUT/best/ (weights + model.json), OUT/tokenizer.json (with the
chat tokens), OUT/result.json.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from gptcore.config import SFTConfig
from gptcore.data.chat import conversations, inputs_and_targets, pack, spread
from gptcore.fsutil import atomic_file, write_json
from gptcore.layout import PAD, RESULT_FILE, TOKENIZER_FILE
from gptcore.model import GPT, sequence_nll
from gptcore.peft import apply_peft, trainable_fraction
from gptcore.results import SFTResult, load_pretrained, load_tokenizer
from gptcore.runtime.template import add_chat_tokens, render
from gptcore.tracking import Tracking, stage_run
from gptcore.train.batches import RowBatches
from gptcore.train.distributed import setup
from gptcore.train.loop import fit, lm_loss
from gptcore.weights import load_lm

log = logging.getLogger("gptcore.sft")


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
    tok = load_tokenizer(tokenized_dir)
    chat_ids = add_chat_tokens(tok)
    gpt, meta = load_lm(load_pretrained(pretrained_dir).best_dir, vocab_size=tok.get_vocab_size())
    meta = {**meta, "model": asdict(gpt.cfg)}  # the vocabulary now holds the chat tokens
    pad_id = tok.token_to_id(PAD)
    block = gpt.cfg.block_size
    train, val = (
        conversations(cfg, data_dir, "train"),
        spread(conversations(cfg, data_dir, "val"), cfg.eval_conversations),
    )
    train_rows = pack([render(c, tok, chat_ids) for c in train], block, pad_id)
    val_rows = pack([render(c, tok, chat_ids) for c in val], block, pad_id)
    torch.manual_seed(cfg.seed)
    meta = {**meta, "sft": {"chat_tokens": chat_ids, "data": cfg.data or "plays"}, "peft": apply_peft(gpt, cfg)}
    meta["trainable_fraction"] = trainable_fraction(gpt)
    log.info("sft: %s fine-tuning trains %.2f%% of the parameters", cfg.method, 100 * meta["trainable_fraction"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / TOKENIZER_FILE) as tmp:
        tok.save(str(tmp))

    val_inputs, val_targets = inputs_and_targets(val_rows.ids, val_rows.loss)

    def evaluate(m: GPT) -> dict[str, float]:  # the mean NLL of the tokens SFT trains on
        nll = sequence_nll(m, val_inputs, val_targets, cfg.batch_size)
        return {"val_response_loss": float(nll.sum() / val_rows.loss[:, 1:].sum())}

    tags = {"gptcore.data_digest": meta["data_digest"], "gptcore.tokenizer_digest": meta["tokenizer_digest"]}
    with stage_run(tracking, "sft", tags=tags, system_metrics=True) as run:
        run.log_params(
            {
                "sft": asdict(cfg),
                "train_conversations": len(train),
                "val_conversations": len(val),
                "train_rows": len(train_rows),
                "chat_tokens": ", ".join(f"{t} {i}" for t, i in chat_ids.items()),
            }
        )
        run.log_metrics({"train/trainable_fraction": meta["trainable_fraction"]})
        loss_tokens = int(train_rows.loss.sum())
        log.info(
            "sft: %d train conversations packed into %d rows of %d tokens (%.0f%% carry loss, %d cut to fit); "
            "%d val conversations",
            len(train),
            len(train_rows),
            block + 1,
            100 * loss_tokens / train_rows.loss.size,
            train_rows.truncated,
            len(val),
        )
        fitted = fit(
            "sft",
            gpt,
            cfg,
            RowBatches(train_rows, cfg.batch_size, cfg.seed),
            lm_loss,
            evaluate,
            out_dir=out_dir,
            meta=meta,
            run=run,
            select=("val_response_loss", "min"),
            dist=setup(cfg.device),
            resume=resume,
            patience=cfg.patience,
        )
        result = SFTResult(
            out_dir=str(out_dir),
            best_dir=fitted.best_dir,
            tokenizer_path=str(out_dir / TOKENIZER_FILE),
            steps=fitted.steps,
            stopped_early=fitted.stopped_early,
            best_val_response_loss=fitted.best_metrics["val_response_loss"],
            train_conversations=len(train),
            val_conversations=len(val),
            train_rows=len(train_rows),
            truncated=train_rows.truncated,
            train_seconds=fitted.train_seconds,
        )
        write_json(out_dir / RESULT_FILE, asdict(result))
        run.log_metrics({"best/val_response_loss": result.best_val_response_loss})
        run.log_artifact(result.tokenizer_path)
    return result
