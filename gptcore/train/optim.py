"""Optimizers and the learning-rate schedule of the training loop.

AdamW decays matrices only; with `optimizer: muon` the blocks' weight matrices go to `Muon`
and the rest stays with AdamW. Every optimizer follows one schedule: linear warmup, then cosine
decay to min_lr.
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


def orthogonalise(g: torch.Tensor, dtype: torch.dtype, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(R, K) -> (R, K) near U V^T of g = U S V^T, by Newton-Schulz's quintic iteration in `dtype`.

    Muon's coefficients (Keller Jordan's) bring singular values a hundredfold apart into about
    [0.7, 1.2] in five steps rather than to exactly 1, which trains as well. The iteration runs on
    the wide form (rows <= columns), whose Gram matrix is the smaller.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(0) > g.size(1)
    x = g.to(dtype).T if tall else g.to(dtype)  # (r, k), r <= k
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def orthogonalisation_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matmuls run it natively (CUDA, CPUs whose oneDNN has bf16), fp32 elsewhere: run
    as a CPU with AVX2 only, the default preset's Muon step took 0.51 s in bf16 against 0.032 s
    in fp32, which doubled the recipe's step."""
    if device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: Nesterov momentum, then the update orthogonalised, its lr scaled by
    sqrt(max(1, rows / columns)), and decoupled weight decay: `torch.optim.Muon`'s update and
    state, but orthogonalising in `ns_dtype` (torch's always takes bf16)."""

    def __init__(self, params, lr: float, weight_decay: float, ns_dtype: torch.dtype, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - beta)
                update = orthogonalise(p.grad.lerp(buf, beta), self.ns_dtype)  # Nesterov: a step ahead
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))


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

    With `optimizer: muon`, the blocks' weight matrices go to `Muon` instead (the embedding and
    LM head stay with AdamW, as Muon's authors advise).
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
    muon_opt = Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=orthogonalisation_dtype(device))
    return Optimizers([muon_opt, adamw], cfg)
