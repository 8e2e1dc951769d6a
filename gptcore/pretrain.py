"""Pretraining: next-token prediction on the token files, through the shared training loop.

Output: OUT/checkpoints/step_*/ (resumable), OUT/best/ (lowest validation loss: the weights
that evaluation and export read) and OUT/result.json.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptcore.config import ModelConfig, TrainConfig
from gptcore.errors import InputError
from gptcore.fsutil import read_stage_output, write_json
from gptcore.model import GPT
from gptcore.tokenizer import load_tokenized, read_tokens
from gptcore.tracking import Tracking, stage_run
from gptcore.distributed import setup, teardown
from gptcore.train import fit

log = logging.getLogger("gptcore.pretrain")


class TokenBatches:
    """Random (input, target) windows of a token memmap, drawn with a generator of its own.

    Each optimizer step draws one global batch of world_size x grad_accum x batch_size window
    starts, the same on every rank, and a rank reads only its share: what a step trains on does
    not depend on how it is spread over processes, and the generator state is the data position.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, grad_accum_steps: int = 1, pin: bool = False):
        if len(tokens) <= block_size + 1:
            raise InputError(f"the train split has {len(tokens)} tokens; block_size={block_size} needs more")
        self.tokens, self.batch_size, self.block_size, self.pin = tokens, batch_size, block_size, pin
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[torch.Tensor] = []  # this rank's micro-batches of the current step

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pending:
            per_rank = self.grad_accum_steps * self.batch_size
            starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.world_size * per_rank,),
                                   generator=self.generator)
            self.pending = list(starts[self.rank * per_rank : (self.rank + 1) * per_rank].split(self.batch_size))
        starts = self.pending.pop(0)
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        window = torch.from_numpy(rows)  # (B, T + 1)
        if self.pin:
            window = window.pin_memory()  # lets the copy to the GPU overlap compute
        return window[:, :-1], window[:, 1:]  # (B, T) inputs, (B, T) targets

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are taken between steps, when no micro-batch of a step is pending.
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.pending = []


def fixed_windows(tokens: np.ndarray, block_size: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` non-overlapping (T + 1)-token windows, evenly spread: (N, T + 1)."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise InputError(f"a split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
    picks = np.linspace(0, n - 1, num=min(n, max_windows)).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[i * block_size : i * block_size + block_size + 1] for i in picks]).astype(np.int64))


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    _, loss = model(x, targets=y)
    return loss


@torch.no_grad()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        _, loss = model(w[:, :-1], targets=w[:, 1:])
        total += loss.item() * len(w)
        count += len(w)
    return total / count


@dataclass
class PretrainResult:
    out_dir: str
    best_dir: str
    model: dict[str, Any]
    num_params: int
    steps: int
    best_val_loss: float
    tokens_seen: int
    train_seconds: float
    data_digest: str
    tokenizer_digest: str


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
    meta = {"kind": "lm", "model": asdict(model_cfg), "data_digest": tokens.data_digest,
            "tokenizer_digest": tokens.tokenizer_digest, "tokens_digest": tokens.digest}
    batches = TokenBatches(read_tokens(tokens, "train"), train_cfg.batch_size, model_cfg.block_size, train_cfg.seed,
                           dist.rank, dist.world_size, train_cfg.grad_accum_steps, pin=dist.device.type == "cuda")
    val_windows = fixed_windows(read_tokens(tokens, "val"), model_cfg.block_size, train_cfg.eval_batches * train_cfg.batch_size)
    tags = {"gptcore.data_digest": tokens.data_digest, "gptcore.tokenizer_digest": tokens.tokenizer_digest,
            "gptcore.tokens_digest": tokens.digest}
    try:
        with stage_run(tracking if dist.is_main else None, "pretrain", tags=tags) as run:
            run.log_dataset(Path(tokenized_dir) / "tokens.json", tokens.digest, name="tokens")
            run.log_params({"model": asdict(model_cfg), "train": asdict(train_cfg), "num_params": model.num_parameters(),
                            "world_size": dist.world_size})
            log.info("pretrain: %.2fM parameters, %d steps of %d x %d x %d tokens on %s x %d", model.num_parameters() / 1e6,
                     train_cfg.max_steps, dist.world_size, train_cfg.batch_size * train_cfg.grad_accum_steps,
                     model_cfg.block_size, dist.device, dist.world_size)
            fitted = fit(
                "pretrain", model, train_cfg, batches, lm_loss,
                evaluate=lambda m: {"val_loss": mean_loss(m, val_windows, train_cfg.batch_size)},
                out_dir=out_dir, meta=meta, run=run, select=("val_loss", "min"), dist=dist, resume=resume,
                flops_per_token=model.flops_per_token(),
            )
            result = PretrainResult(
                out_dir=str(out_dir), best_dir=fitted.best_dir, model=asdict(model_cfg),
                num_params=model.num_parameters(), steps=fitted.steps, best_val_loss=fitted.best_metrics["val_loss"],
                tokens_seen=fitted.tokens_seen, train_seconds=fitted.train_seconds, data_digest=tokens.data_digest,
                tokenizer_digest=tokens.tokenizer_digest,
            )
            if dist.is_main:
                write_json(Path(out_dir) / "result.json", asdict(result))
            run.log_metrics({"best_val_loss": result.best_val_loss, "train_seconds": result.train_seconds})
    finally:
        teardown(dist)
    return result


def load_pretrained(out_dir: str | Path) -> PretrainResult:
    return PretrainResult(**read_stage_output(out_dir, "result.json", "pretrained model", "pretrain"))
