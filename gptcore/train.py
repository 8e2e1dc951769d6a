"""The training loop that pretraining and fine-tuning share, and the pieces it is made of.

A stage hands `fit` a model, a batch source (with its own seeded generator, saved in every
checkpoint), a loss and an evaluation function; `fit` runs AdamW with linear warmup and cosine
decay, gradient accumulation and clipping, bf16 autocast on CUDA, periodic evaluation, early
stopping, resumable checkpoints and the best weights, and reports progress with rate and ETA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gptcore.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights, set_rng_state
from gptcore.config import TrainConfig
from gptcore.tracking import StageRun

log = logging.getLogger("gptcore.train")


class BatchSource(Protocol):
    def next(self) -> tuple[torch.Tensor, ...]: ...  # first tensor: input ids (B, T)
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast where the GPU has bf16 units; plain fp32 elsewhere (CPU bf16 is far slower here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices only: no weight decay on biases, norms or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_multiplier(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to min_lr/lr at max_steps."""
    floor = cfg.min_lr / cfg.lr

    def at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return at


@dataclass
class FitResult:
    steps: int
    best_dir: str
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    stopped_early: bool
    tokens_seen: int
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def fit(
    name: str,
    model: torch.nn.Module,
    cfg: TrainConfig,
    batches: BatchSource,
    loss_fn: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    out_dir: str | Path,
    meta: dict[str, Any],
    run: StageRun,
    select: tuple[str, str],
    resume: bool = False,
    patience: int | None = None,
) -> FitResult:
    """Train `model` for cfg.max_steps; keep the weights that are best on `select` = (metric, min|max).

    Writes OUT/checkpoints/step_*/ (resumable) and OUT/best/ (weights + model.json). With
    `resume`, continues from the latest complete checkpoint in OUT/checkpoints.
    """
    out_dir = Path(out_dir)
    ckpt_dir, best_dir = out_dir / "checkpoints", out_dir / "best"
    device = pick_device(cfg.device)
    model.to(device)
    optimizer = configure_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    metric, mode = select
    state = {"best": None, "best_metrics": {}, "bad_evals": 0, "tokens_seen": 0}
    step = 0
    if resume and (latest := latest_checkpoint(ckpt_dir)) is not None:
        saved = load_checkpoint(latest, model)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["batches"])
        state = saved["loop"]
        step = saved["step"]
        set_rng_state(saved["rng"])
        log.info("%s: resumed from %s (step %d)", name, latest, step)
        run.set_tags({"gptcore.resumed_from_step": step})
    elif resume:
        log.info("%s: --resume given but no complete checkpoint in %s; starting fresh", name, ckpt_dir)
    step_fn = torch.compile(model) if cfg.compile else model
    start_step, last_metrics, history = step, {}, []
    t0 = t_log = time.perf_counter()
    tokens_since_log, steps_since_log, loss_sum = 0, 0, torch.zeros((), device=device)
    while step < cfg.max_steps:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum_steps):
            batch = tuple(t.to(device, non_blocking=True) for t in batches.next())
            with autocast(device):
                loss = loss_fn(step_fn, batch) / cfg.grad_accum_steps
            loss.backward()
            loss_sum += loss.detach()  # no host sync here: read back at log time
            tokens_since_log += batch[0].numel()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        steps_since_log += 1
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            steps_done = step - start_step
            train_loss = loss_sum.item() / steps_since_log
            rate = tokens_since_log / (now - t_log)
            eta = (now - t0) / steps_done * (cfg.max_steps - step)
            lr = scheduler.get_last_lr()[0]
            log.info("%s: step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | ETA %s", name, step, cfg.max_steps,
                     train_loss, lr, rate, format_duration(eta))
            run.log_metrics({"train_loss": train_loss, "lr": lr, "tokens_per_s": rate}, step=step)
            state["tokens_seen"] += tokens_since_log
            tokens_since_log, steps_since_log, loss_sum, t_log = 0, 0, torch.zeros((), device=device), now
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            model.eval()
            with torch.no_grad(), autocast(device):
                last_metrics = evaluate(model)
            history.append({"step": step, **last_metrics})
            run.log_metrics(last_metrics, step=step)
            value = last_metrics[metric]
            improved = state["best"] is None or (value < state["best"] if mode == "min" else value > state["best"])
            log.info("%s: step %d eval %s%s", name, step,
                     " ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()), " (best)" if improved else "")
            if improved:
                state.update(best=value, best_metrics=dict(last_metrics), bad_evals=0)
                save_weights(model, best_dir, meta)
            else:
                state["bad_evals"] += 1
        stop = patience is not None and state["bad_evals"] >= patience
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stop:
            save_checkpoint(ckpt_dir, step, model, meta, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "batches": batches.state_dict(), "loop": state}, cfg.keep_checkpoints)
        if stop:
            log.info("%s: no better %s for %d evaluations: stopping early at step %d", name, metric, patience, step)
            break
    return FitResult(
        steps=step,
        best_dir=str(best_dir),
        best_metrics=state["best_metrics"],
        last_metrics=last_metrics,
        stopped_early=step < cfg.max_steps,
        tokens_seen=state["tokens_seen"],
        train_seconds=time.perf_counter() - t0,
        history=history,
    )
