"""Pretraining: next-token prediction on the token files, through the shared training loop.

Output: OUT/checkpoints/step_*/ (resumable), OUT/best/ (lowest validation loss: the weights
that evaluation and export read) and OUT/result.json.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from gptcore.config import ModelConfig, TrainConfig
from gptcore.fsutil import write_json
from gptcore.layout import RESULT_FILE, TOKENS_MANIFEST
from gptcore.model import GPT, sequence_nll
from gptcore.results import PretrainResult, load_tokenized, read_tokens
from gptcore.tracking import Tracking, stage_run
from gptcore.train.batches import TokenBatches, fixed_windows
from gptcore.train.distributed import setup, teardown
from gptcore.train.loop import fit, lm_loss

log = logging.getLogger("gptcore.pretrain")


def pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
    resume: bool = False,
) -> PretrainResult:
    """Train a GPT from scratch on the token files in `tokenized_dir` (or resume one) into `out_dir`."""
    tokens = load_tokenized(tokenized_dir)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokens.vocab_size)
    dist = setup(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    meta = {
        "kind": "lm",
        "model": asdict(model_cfg),
        "data_digest": tokens.data_digest,
        "tokenizer_digest": tokens.tokenizer_digest,
        "tokens_digest": tokens.digest,
    }
    batches = TokenBatches(
        read_tokens(tokens, "train"),
        train_cfg.batch_size,
        model_cfg.block_size,
        train_cfg.seed,
        dist.rank,
        dist.world_size,
        train_cfg.grad_accum_steps,
        pin=dist.device.type == "cuda",
    )
    val_windows = fixed_windows(
        read_tokens(tokens, "val"), model_cfg.block_size, train_cfg.eval_batches * train_cfg.batch_size
    )
    tags = {
        "gptcore.data_digest": tokens.data_digest,
        "gptcore.tokenizer_digest": tokens.tokenizer_digest,
        "gptcore.tokens_digest": tokens.digest,
    }
    try:
        with stage_run(tracking if dist.is_main else None, "pretrain", tags=tags, system_metrics=True) as run:
            run.log_dataset(Path(tokenized_dir) / TOKENS_MANIFEST, tokens.digest, name="tokens")
            run.log_params(
                {
                    "model": asdict(model_cfg),
                    "train": asdict(train_cfg),
                    "num_params": model.num_parameters(),
                    "world_size": dist.world_size,
                }
            )
            log.info(
                "pretrain: %.2fM parameters, %d steps of %d x %d x %d tokens on %s x %d",
                model.num_parameters() / 1e6,
                train_cfg.max_steps,
                dist.world_size,
                train_cfg.batch_size * train_cfg.grad_accum_steps,
                model_cfg.block_size,
                dist.device,
                dist.world_size,
            )
            fitted = fit(
                "pretrain",
                model,
                train_cfg,
                batches,
                lm_loss,
                evaluate=lambda m: {
                    "val_loss": float(
                        sequence_nll(m, val_windows[:, :-1], val_windows[:, 1:], train_cfg.batch_size).mean()
                    )
                },
                out_dir=out_dir,
                meta=meta,
                run=run,
                select=("val_loss", "min"),
                dist=dist,
                resume=resume,
                flops_per_token=model.flops_per_token(),
            )
            result = PretrainResult(
                out_dir=str(out_dir),
                best_dir=fitted.best_dir,
                model=asdict(model_cfg),
                num_params=model.num_parameters(),
                steps=fitted.steps,
                best_val_loss=fitted.best_metrics["val_loss"],
                tokens_seen=fitted.tokens_seen,
                train_seconds=fitted.train_seconds,
                data_digest=tokens.data_digest,
                tokenizer_digest=tokens.tokenizer_digest,
            )
            if dist.is_main:
                write_json(Path(out_dir) / RESULT_FILE, asdict(result))
            run.log_metrics({"best/val_loss": result.best_val_loss, "train/seconds": result.train_seconds})
    finally:
        teardown(dist)
    return result
