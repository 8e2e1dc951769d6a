"""The training loop every training stage shares (pretraining, classification, chat SFT).

A stage hands `fit` a model, a batch source (`gptcore.train.batches`: a seeded generator of its
own, saved in every checkpoint), a loss and an evaluation function; `fit` runs the optimizers
(`gptcore.train.optim`) with gradient accumulation and clipping, bf16 autocast on CUDA,
periodic evaluation, early stopping, resumable checkpoints and the best weights, and reports
progress with rate and ETA.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gptcore.config import TrainConfig
from gptcore.fsutil import append_jsonl, truncate_jsonl
from gptcore.layout import BEST_DIR
from gptcore.tracking import StageRun
from gptcore.train.checkpoint import resume_point, rng_state, save_checkpoint, set_rng_state
from gptcore.train.curves import log_loss_chart, tracked_name
from gptcore.train.distributed import DistInfo, barrier, gather_to_all, mean_across_ranks
from gptcore.train.optim import configure_optimizers
from gptcore.train.parallel import data_parallel
from gptcore.train.perf import peak_flops, peak_memory_bytes
from gptcore.weights import save_weights, tied_aliases

log = logging.getLogger("gptcore.train")


class BatchSource(Protocol):
    def next(self) -> tuple[torch.Tensor, ...]: ...  # first tensor: input ids (B, T)
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lm_loss(model: Callable, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The GPT's own loss on (inputs, targets) batches: pretraining's and chat SFT's."""
    x, y = batch
    _, loss = model(x, targets=y)
    return loss


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the fp32 matmuls autocast leaves (Ampere and newer)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device):
    """bf16 autocast where the GPU has bf16 units; plain fp32 elsewhere (CPU bf16 is far slower here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


class CompiledOrEager:
    """`torch.compile(model)` that falls back to eager, with a warning, if compiling fails."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.eager, self.compiled = model, None
        if enabled:
            try:
                self.compiled = torch.compile(model)
            except Exception as e:  # unsupported platform or Python: train eagerly
                log.warning("torch.compile unavailable (%s); training eagerly", e)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # compilation happens on the first call: a failed backend shows here
            log.warning("torch.compile failed (%s: %s); training eagerly", type(e).__name__, e)
            self.compiled = None
            return self.eager(*args, **kwargs)


class TrainClock:
    """Seconds spent training, evaluation and checkpointing excluded; carried across resumes.

    Readings wait for the GPU (kernels run asynchronously), so take them only at log intervals.
    """

    def __init__(self, device: torch.device, seconds: float = 0.0):
        self.device, self.seconds, self.lap_seconds = device, seconds, 0.0
        self.resume()

    def resume(self) -> None:
        self.started = time.perf_counter()

    def pause(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds += now - self.started
        self.lap_seconds += now - self.started
        self.started = now

    def lap(self) -> float:
        """Training seconds since the last lap."""
        self.pause()
        seconds, self.lap_seconds = self.lap_seconds, 0.0
        return seconds


# A time-budgeted run measures its step time from these steps of the run, past the first steps'
# one-off costs (compilation, allocator warm-up), then fixes how many steps fit; it fits them
# again at every log step from all the steps timed since, because a run's step time drifts
# after its first steps (a probe 10% slow left a tenth of the budget unused).
BUDGET_PROBE = (5, 25)


def fit_budget(
    name: str, cfg: TrainConfig, steps_this_run: int, step: int, clock: TrainClock, state: dict[str, Any]
) -> None:
    """Set state["budget_steps"], the steps that fit cfg.time_budget_s: first once the probe steps
    are timed, then again at each call after (the loop calls at log steps only, where the clock
    is read anyway). The step time is the mean since the probe began, resumes included."""
    if state["budget_steps"] is None and steps_this_run == BUDGET_PROBE[0]:
        clock.pause()
        state["probe_from"] = [step, clock.seconds]
        return
    if (state["budget_steps"] is None and steps_this_run != BUDGET_PROBE[1]) or "probe_from" not in state:
        return  # between probes, or resumed from a checkpoint that kept no probe (fixed once then)
    clock.pause()
    from_step, from_seconds = state["probe_from"]
    per_step = (clock.seconds - from_seconds) / (step - from_step)
    fits = step + int(max(0.0, cfg.time_budget_s - clock.seconds) / per_step)
    steps = max(step, min(cfg.max_steps, fits))
    if steps != state["budget_steps"]:
        log.info(
            "%s: %.1f ms a step: %d steps fit the %.0f s budget%s",
            name,
            per_step * 1e3,
            fits,
            cfg.time_budget_s,
            f" (capped at max_steps={cfg.max_steps})" if fits > cfg.max_steps else "",
        )
    state["budget_steps"] = steps


def fit(
    name: str,
    model: torch.nn.Module,
    cfg: TrainConfig,
    batches: BatchSource,
    loss_fn: Callable[[Callable, tuple[torch.Tensor, ...]], torch.Tensor],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    out_dir: str | Path,
    meta: dict[str, Any],
    run: StageRun,
    select: tuple[str, str],
    dist: DistInfo,
    resume: bool = False,
    patience: int | None = None,
    flops_per_token: float | None = None,
) -> FitResult:
    """Train `model` for cfg.max_steps (or cfg.time_budget_s); keep the weights best on `select` = (metric, min|max).

    Writes OUT/checkpoints/step_*/ (resumable), OUT/best/ (weights + model.json) and
    OUT/metrics.jsonl (every logged step, readable without MLflow). With `resume`, continues
    from the latest readable complete checkpoint in OUT/checkpoints, if it is this run's work
    (`gptcore.train.checkpoint.resume_point`). Under torchrun the model is replicated (DDP) or
    sharded (FSDP) as cfg.parallelism says; rank 0 alone logs and writes.
    """
    out_dir = Path(out_dir)
    ckpt_dir, best_dir, metrics_log = out_dir / "checkpoints", out_dir / BEST_DIR, out_dir / "metrics.jsonl"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device
    enable_tf32(device)
    aliases = tied_aliases(model)  # before sharding: FSDP replaces the parameters
    parallel = data_parallel(cfg.parallelism, dist)
    wrapped = parallel.wrap(model)
    if dist.enabled:
        log.info("%s: %s over %d ranks (%s)", name, parallel.describe, dist.world_size, parallel.name)
    optimizers = configure_optimizers(model, cfg, device)
    metric, mode = select
    state = {
        "best": None,
        "best_metrics": {},
        "bad_evals": 0,
        "tokens_seen": 0,
        "train_seconds": 0.0,
        "budget_steps": None,
    }
    step = 0
    settings = asdict(cfg)
    resumed = resume_point(ckpt_dir, name, meta, settings) if resume else None
    if resumed is not None:
        latest, weights, saved = resumed
        parallel.load(model, weights, aliases, optimizers.optimizers, saved["optimizers"])
        optimizers.load_scheduler_states(saved["schedulers"])
        batches.load_state_dict(saved["batches"])
        state, step = saved["loop"], saved["step"]
        set_rng_state(saved["rng"][dist.rank if len(saved["rng"]) == dist.world_size else 0])
        if dist.is_main:
            truncate_jsonl(metrics_log, lambda record: record["step"] <= step)
        log.info("%s: resumed from %s (step %d)", name, latest, step)
        run.set_tags({"gptcore.resumed_from_step": step})
    else:
        if resume:
            log.info("%s: --resume given but no complete checkpoint in %s; starting fresh", name, ckpt_dir)
        if dist.is_main:
            metrics_log.unlink(missing_ok=True)
    schedule = optimizers.schedule
    schedule.total_steps = state["budget_steps"] or cfg.max_steps
    forward = CompiledOrEager(wrapped, cfg.compile)
    peak = peak_flops(device, cfg.peak_tflops)
    start_step, last_metrics, history = step, {}, []
    clock = TrainClock(device, state["train_seconds"])
    t0 = time.perf_counter()
    tokens_since_log, steps_since_log, loss_sum = 0, 0, torch.zeros((), device=device)
    while step < schedule.total_steps:
        model.train()
        optimizers.zero_grad()
        for micro in range(cfg.grad_accum_steps):
            batch = tuple(t.to(device, non_blocking=True) for t in batches.next())
            with parallel.gradient_sync(wrapped, sync=micro == cfg.grad_accum_steps - 1):
                with autocast(device):
                    loss = loss_fn(forward, batch) / cfg.grad_accum_steps
                loss.backward()
            loss_sum += loss.detach()  # no host sync here: read back at log time
            tokens_since_log += batch[0].numel() * dist.world_size
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizers.step()
        step += 1
        steps_since_log += 1
        if cfg.time_budget_s and (state["budget_steps"] is None or step % cfg.log_interval == 0):
            fit_budget(name, cfg, step - start_step, step, clock, state)
            schedule.total_steps = state["budget_steps"] or cfg.max_steps
        last = step == schedule.total_steps
        if step % cfg.log_interval == 0 or last:
            train_loss = mean_across_ranks(loss_sum, dist).item() / steps_since_log
            rate = tokens_since_log / clock.lap()
            eta = (time.perf_counter() - t0) / (step - start_step) * (schedule.total_steps - step)
            record = {
                "step": step,
                "train_loss": train_loss,
                "lr": optimizers.last_lr(),
                "tokens_per_s": rate,
                "peak_mem_bytes": peak_memory_bytes(device),
            }
            if peak and flops_per_token:
                record["mfu"] = flops_per_token * rate / (peak * dist.world_size)
            log.info(
                "%s: step %d/%d | loss %.4f | lr %.2e | %.0f tok/s%s | ETA %s",
                name,
                step,
                schedule.total_steps,
                train_loss,
                record["lr"],
                rate,
                f" | MFU {record['mfu']:.1%}" if "mfu" in record else "",
                format_duration(eta),
            )
            if dist.is_main:
                append_jsonl(metrics_log, record)
                run.log_metrics({tracked_name(k): v for k, v in record.items() if k != "step"}, step=step)
            state["tokens_seen"] += tokens_since_log
            tokens_since_log, steps_since_log, loss_sum = 0, 0, torch.zeros((), device=device)
        if step % cfg.eval_interval == 0 or last:
            clock.pause()  # training time excludes evaluation and checkpointing
            model.eval()
            with torch.no_grad(), autocast(device):
                last_metrics = evaluate(model)  # every rank: the weights agree, so do the decisions
            history.append({"step": step, **last_metrics})
            value = last_metrics[metric]
            improved = state["best"] is None or (value < state["best"] if mode == "min" else value > state["best"])
            log.info(
                "%s: step %d eval %s%s",
                name,
                step,
                " ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()),
                " (best)" if improved else "",
            )
            if improved:
                state.update(best=value, best_metrics=dict(last_metrics), bad_evals=0)
            else:
                state["bad_evals"] += 1
            weights = parallel.full_weights(model, aliases) if improved else None  # every rank: FSDP gathers
            if dist.is_main:
                append_jsonl(metrics_log, {"step": step, **last_metrics})
                run.log_metrics({tracked_name(k): v for k, v in last_metrics.items()}, step=step)
                if improved:
                    save_weights(weights, best_dir, meta)
            clock.resume()
        stop = patience is not None and state["bad_evals"] >= patience
        if step % cfg.checkpoint_interval == 0 or last or stop:
            clock.pause()
            state["train_seconds"] = clock.seconds
            rngs = gather_to_all(rng_state(), dist)  # each rank's dropout stream, for an exact resume
            weights = parallel.full_weights(model, aliases)
            optimizer_states = parallel.optimizer_states(model, optimizers.optimizers)
            if dist.is_main:
                save_checkpoint(
                    ckpt_dir,
                    step,
                    weights,
                    meta,
                    {
                        "optimizers": optimizer_states,
                        "schedulers": optimizers.scheduler_states(),
                        "batches": batches.state_dict(),
                        "loop": state,
                        "rng": rngs,
                        "config": settings,  # what a resume checks its own settings against
                    },
                    cfg.keep_checkpoints,
                )
            barrier(dist)
            clock.resume()
        if stop:
            log.info("%s: no better %s for %d evaluations: stopping early at step %d", name, metric, patience, step)
            break
    clock.pause()
    state["train_seconds"] = clock.seconds
    if dist.is_main:
        log_loss_chart(run, name, metrics_log)
    return FitResult(
        steps=step,
        best_dir=str(best_dir),
        best_metrics=state["best_metrics"],
        last_metrics=last_metrics,
        stopped_early=step < schedule.total_steps,
        tokens_seen=state["tokens_seen"],
        train_seconds=state["train_seconds"],
        history=history,
    )
