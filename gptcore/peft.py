"""Parameter-efficient fine-tuning: LoRA (Hu et al., 2021) on the GPT's linear and embedding layers.

`apply_lora(model, ...)` swaps the targeted modules (named by suffix, e.g. `attn.qkv`, `wte`)
for `LoRALinear` / `LoRAEmbedding`, which keep the pretrained weight frozen and learn a
low-rank update: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with A (r, in) and B (out, r).
One factor starts at zero, so training starts from the pretrained model exactly. `merge_lora`
folds the update into the weight and restores plain modules, so export and serving see an
ordinary GPT.

Our own small module rather than the `peft` library: `peft` brings `transformers` and
`accelerate` along, and its prefix-tuning works on Hugging Face models' caches, not ours.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` (same parameter names, so checkpoints line up) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the pretrained tensors themselves
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return super().forward(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class LoRAEmbedding(nn.Embedding):
    """A frozen `nn.Embedding` plus a trainable low-rank update of its table: E + (alpha / r) A B.

    A (V, r) starts at zero and B (r, C) random, as the LoRA authors do for embeddings: what
    a passage's words say (in Shakespeare, the characters' names) lives in the table.
    """

    def __init__(self, base: nn.Embedding, rank: int, alpha: float):
        super().__init__(base.num_embeddings, base.embedding_dim, device="meta")
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.zeros(base.num_embeddings, rank, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.randn(rank, base.embedding_dim, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return super().forward(idx) + nn.functional.embedding(idx, self.lora_a) @ self.lora_b * self.scale

    def merged(self) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.weight.device)
        with torch.no_grad():
            embedding.weight.copy_(self.weight + self.scale * (self.lora_a @ self.lora_b))
        return embedding


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
               trainable: tuple[str, ...] = ()) -> int:
    """Put LoRA on every `nn.Linear` whose name ends with one of `targets`; freeze everything else
    except the modules named in `trainable` (e.g. the classifier head). Returns how many were wrapped."""
    names = [n for n, m in model.named_modules()
             if type(m) in (nn.Linear, nn.Embedding) and any(n.endswith(t) for t in targets)]
    if not names:
        raise ValueError(f"no linear or embedding layer matches the LoRA targets {targets}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear(base, rank, alpha, dropout) if type(base) is nn.Linear
                 else LoRAEmbedding(base, rank, alpha))
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    return len(names)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and restore plain linear layers (in place); all trainable again."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]:
        merged = module.merged()
        for other in model.modules():  # a weight tied elsewhere (the LM head to the embedding) stays tied
            if other is not module and getattr(other, "weight", None) is module.weight:
                other.weight = merged.weight
        _replace(model, name, merged)
    model.requires_grad_(True)
    return model


def trainable_fraction(model: nn.Module) -> float:
    params = {id(p): p for p in model.parameters()}.values()  # a tied tensor counts once
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
