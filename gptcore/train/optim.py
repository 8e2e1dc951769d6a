"""Optimizers and the learning-rate schedule of the training loop.

AdamW decays matrices only; with `optimizer: muon` the blocks' weight matrices go to
`torch.optim.Muon` and the rest stays with AdamW. Every optimizer follows one schedule: linear
warmup, then cosine decay to min_lr.
"""

from __future__ import annotations

import math

import torch

from gptcore.config import TrainConfig


class LRSchedule:
    """Linear warmup to 1, then cosine decay to min_lr/lr at `total_steps`.

    `total_steps` is max_steps, or, with a time budget, the steps that fit it (set once measured).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.total_steps = cfg, cfg.max_steps

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        floor = cfg.min_lr / cfg.lr
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Optimizers:
    """One or two optimizers (AdamW, or Muon + AdamW) stepped together, each on the same LR schedule."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], cfg: TrainConfig):
        self.optimizers = optimizers
        self.schedule = LRSchedule(cfg)
        # A plain function, not the schedule object: LambdaLR would pickle an object's attributes.
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: self.schedule(step)) for o in optimizers]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o, s in zip(self.optimizers, self.schedulers):
            o.step()
            s.step()

    def last_lr(self) -> float:
        return self.schedulers[-1].get_last_lr()[0]  # AdamW's: the one cfg.lr sets

    def scheduler_states(self) -> list[dict]:
        # The optimizers' own states may be sharded: the data-parallel strategy gathers those.
        return [s.state_dict() for s in self.schedulers]

    def load_scheduler_states(self, states: list[dict]) -> None:
        for s, saved in zip(self.schedulers, states, strict=True):
            s.load_state_dict(saved)


def configure_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW that decays matrices only (no weight decay on biases, norms or embeddings).

    With `optimizer: muon`, the blocks' weight matrices go to `torch.optim.Muon` instead (the
    embedding and LM head stay with AdamW, as Muon's authors advise).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    outer = embeddings | ({id(head.weight)} if head is not None else set())
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.dim() == 2 and id(p) not in outer and ".blocks." in f".{name}":
            muon.append(p)
        else:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if not muon:
        return Optimizers([adamw], cfg)
    return Optimizers([torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay), adamw], cfg)
