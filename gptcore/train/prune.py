"""Structured pruning of a GPT to a smaller shape, by importance measured on training windows.

What a student drops, and how each part's importance is measured (on the teacher, before any cut):
- a block (depth): how much the loss rises when the residual stream skips it;
- a residual channel (n_embd): the mean |output| of the kept blocks' norms and the final norm at that
  channel, as Minitron ranks embedding channels; the embedding, every block and the head lose it;
- a head dimension: for queries and keys, the mean |q_d k_d| summed over heads (one set for all
  heads: the QK-norm weight is shared; with rotary positions, whole pairs (d, d + D/2)); for
  values, each head's own mean |v_d|;
- an MLP neuron: its mean |activation| after the nonlinearity.

The student keeps the top-ranked parts in their original order, their weights sliced out of the
teacher's; the head count stays and each head narrows (D' = n_embd' / n_head). With nothing
removed the student is the teacher, weight for weight. Norm statistics over fewer channels and
rotary frequencies over fewer dimensions change, so a pruned student needs recovery
(distillation, `gptcore.train.compress`) before it is good for anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from gptcore.config import ModelConfig
from gptcore.errors import ConfigError
from gptcore.model import GPT, sequence_nll


def param_count(cfg: ModelConfig) -> int:
    """Parameters of a GPT of this shape, counted without allocating it."""
    with torch.device("meta"):
        return GPT(cfg).num_parameters()


def student_shape(cfg: ModelConfig, fraction: float, prune: str) -> ModelConfig:
    """The largest shape within `fraction` of the teacher's parameters that `prune` reaches.

    `depth` keeps the width and searches the layer count; `width` keeps the layers and searches
    n_embd over multiples of n_head; `both` first keeps round(n_layer * fraction) blocks, then
    searches the width.
    """
    L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
    target = fraction * param_count(cfg)
    layers = {"depth": range(1, L + 1), "width": [L], "both": [max(1, round(L * fraction))]}[prune]
    step = 2 * H if cfg.position == "rope" else H  # rotary needs an even head size
    widths = [C] if prune == "depth" else range(step, C + 1, step)
    shapes = [dataclasses.replace(cfg, n_layer=n, n_embd=c) for n in layers for c in widths]
    fits = [(param_count(s), s) for s in shapes if param_count(s) <= target]
    if not fits:
        smallest = min(param_count(s) for s in shapes)
        raise ConfigError(
            f"compress.fractions: {prune} pruning cannot reach {fraction:.0%} of {param_count(cfg):,} parameters "
            f"(its smallest shape keeps {smallest / param_count(cfg):.0%}; the embedding alone holds "
            f"{cfg.vocab_size * C / param_count(cfg):.0%}); use prune: both or width, or a larger fraction"
        )
    return max(fits, key=lambda f: f[0])[1]


@dataclass
class Importance:
    """What `measure_importance` found on the teacher (L blocks, C channels, H heads of D dims)."""

    block_loss_rise: np.ndarray  # (L,) loss without the block minus the loss with it
    channels: np.ndarray  # (L + 1, C) mean |norm output| per block (ln_1 + ln_2) and the final norm
    qk_dims: np.ndarray  # (L, D) mean |q_d k_d| summed over heads
    v_dims: np.ndarray  # (L, H, D) mean |v_d|
    neurons: np.ndarray  # (L, hidden) mean |activation|


@torch.no_grad()
def measure_importance(model: GPT, windows: np.ndarray, batch_size: int = 16) -> Importance:
    """Each block's, channel's, head dimension's and neuron's importance over (N, T + 1) token windows."""
    cfg = model.cfg
    L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
    D = C // H
    sums = {"channels": torch.zeros(L + 1, C), "qk": torch.zeros(L, D), "v": torch.zeros(L, H, D), "neurons": []}
    model.eval()

    def add(key, index, value):  # value: (B, T, ...) -> its mean over tokens, on the CPU
        sums[key][index] += value.abs().float().mean(dim=(0, 1)).cpu()

    hooks = [model.ln_f.register_forward_hook(lambda m, i, out: add("channels", L, out))]
    for b, block in enumerate(model.blocks):
        sums["neurons"].append(torch.zeros(block.mlp.proj.in_features))
        for norm in (block.ln_1, block.ln_2):
            hooks.append(norm.register_forward_hook(lambda m, i, out, b=b: add("channels", b, out)))

        def qkv_hook(m, i, out, b=b):
            B, T, _ = out.shape
            q, k, v = (t.view(B, T, H, D) for t in out.split(C, dim=2))
            add("qk", b, (q * k).sum(dim=2))
            add("v", b, v)

        hooks.append(block.attn.qkv.register_forward_hook(qkv_hook))
        hooks.append(block.mlp.proj.register_forward_pre_hook(lambda m, args, b=b: add("neurons", b, args[0])))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    try:
        base = sequence_nll(model, inputs, targets, batch_size).mean()
    finally:
        for hook in hooks:
            hook.remove()
    batches = -(-len(windows) // batch_size)  # the hooks added one mean per batch
    blocks = model.blocks
    rise = []
    for b in range(L):  # the loss with block b skipped: its input passes straight on
        model.blocks = torch.nn.ModuleList(blk for i, blk in enumerate(blocks) if i != b)
        try:
            rise.append(sequence_nll(model, inputs, targets, batch_size).mean() - base)
        finally:
            model.blocks = blocks
    return Importance(
        block_loss_rise=np.array(rise),
        channels=(sums["channels"] / batches).numpy(),
        qk_dims=(sums["qk"] / batches).numpy(),
        v_dims=(sums["v"] / batches).numpy(),
        neurons=np.stack([n.numpy() for n in sums["neurons"]]) / batches,
    )


def top(scores: np.ndarray, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties: the earlier index)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return torch.as_tensor(np.sort(order))


@dataclass
class Kept:
    """Which parts of the teacher a student keeps (indices into the teacher's)."""

    blocks: list[int]
    channels: torch.Tensor  # (C',)
    qk_dims: list[torch.Tensor]  # per kept block (D',)
    v_dims: list[torch.Tensor]  # per kept block (H, D')
    neurons: list[torch.Tensor]  # per kept block (hidden',)

    def describe(self) -> dict:
        return {"kept_blocks": self.blocks, "channels": len(self.channels), "head_dim": len(self.qk_dims[0])}


def choose(teacher: ModelConfig, student: ModelConfig, imp: Importance, hidden: int) -> Kept:
    """The most important blocks, channels, head dimensions and neurons that fit `student`."""
    blocks = sorted(np.argsort(-imp.block_loss_rise, kind="stable")[: student.n_layer].tolist())
    channels = top(imp.channels[[*blocks, teacher.n_layer]].sum(axis=0), student.n_embd)
    D, D2 = teacher.n_embd // teacher.n_head, student.n_embd // student.n_head
    qk_dims, v_dims, neurons = [], [], []
    for b in blocks:
        if teacher.position == "rope":  # keep (d, d + D/2) pairs: the rotation mixes the two halves
            pairs = top(imp.qk_dims[b][: D // 2] + imp.qk_dims[b][D // 2 :], D2 // 2)
            qk_dims.append(torch.cat([pairs, pairs + D // 2]))
        else:
            qk_dims.append(top(imp.qk_dims[b], D2))
        v_dims.append(torch.stack([top(head, D2) for head in imp.v_dims[b]]))
        neurons.append(top(imp.neurons[b], hidden))
    return Kept(blocks, channels, qk_dims, v_dims, neurons)


@torch.no_grad()
def prune(teacher: GPT, student_cfg: ModelConfig, imp: Importance) -> tuple[GPT, Kept]:
    """A student of `student_cfg`'s shape made of the teacher's most important parts."""
    student = GPT(student_cfg)
    kept = choose(teacher.cfg, student_cfg, imp, student.blocks[0].mlp.proj.in_features)
    t = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    ch, C, D = kept.channels, teacher.cfg.n_embd, teacher.cfg.n_embd // teacher.cfg.n_head
    heads = torch.arange(teacher.cfg.n_head)[:, None] * D  # (H, 1): each head's first row
    hidden = teacher.blocks[0].mlp.proj.in_features
    s = {"wte.weight": t["wte.weight"][:, ch], "lm_head.weight": t["lm_head.weight"][:, ch]}
    if "wpe.weight" in t:
        s["wpe.weight"] = t["wpe.weight"][:, ch]

    def norm(dst: str, src: str) -> None:  # a norm's weight (and bias) at the kept channels
        s.update({f"{dst}.{k}": t[f"{src}.{k}"][ch] for k in ("weight", "bias") if f"{src}.{k}" in t})

    norm("ln_f", "ln_f")
    for new, old in enumerate(kept.blocks):
        p, q = f"blocks.{old}.", f"blocks.{new}."
        norm(f"{q}ln_1", f"{p}ln_1")
        norm(f"{q}ln_2", f"{p}ln_2")
        qk = (heads + kept.qk_dims[new]).reshape(-1)  # (H * D',) rows of the queries (and keys, + C)
        v = (heads + kept.v_dims[new]).reshape(-1)  # (H * D',) rows of the values (+ 2C), columns of proj
        rows = torch.cat([qk, C + qk, 2 * C + v])
        n = kept.neurons[new]
        fc_rows = torch.cat([n, hidden + n]) if teacher.cfg.mlp == "swiglu" else n
        for name, out_idx, in_idx in (
            ("attn.qkv", rows, ch),
            ("attn.proj", ch, v),
            ("mlp.fc", fc_rows, ch),
            ("mlp.proj", ch, n),
        ):
            s[f"{q}{name}.weight"] = t[f"{p}{name}.weight"][out_idx][:, in_idx]
            if f"{p}{name}.bias" in t:
                s[f"{q}{name}.bias"] = t[f"{p}{name}.bias"][out_idx]
        for name in ("q_norm", "k_norm"):
            if f"{p}attn.{name}.weight" in t:
                s[f"{q}attn.{name}.weight"] = t[f"{p}attn.{name}.weight"][kept.qk_dims[new]]
    student.load_state_dict(s, strict=True)
    return student, kept
