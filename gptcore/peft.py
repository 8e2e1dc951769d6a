"""Parameter-efficient fine-tuning: one entry point for every stage that fine-tunes a GPT.

    description = apply_peft(model, cfg, trainable=("head",))  # before training; store as meta["peft"]
    restore_peft(model, description)                           # when loading: before load_weights
    merge_peft(model)                                          # then: LoRA folded, for evaluation and export

`cfg.method` (a `PeftConfig`) picks the method. `full` trains every weight; the others freeze
the GPT and train the modules named in `trainable` (a classifier's head) plus:

- `lora` (Hu et al., 2021): `LoRALinear` / `LoRAEmbedding` on the layers named by suffix in
  `lora_targets` (e.g. `attn.qkv`, `wte`) learn a low-rank update of the frozen weight,
  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T. `merge_peft` folds it into the weight,
  so evaluation and export see an ordinary GPT.
- `adapter` (Houlsby et al., 2019): `AdapterLinear` on each block's `attn.proj` and
  `mlp.proj` adds a residual bottleneck y + up(gelu(down(y))); the norms train too, as
  in the paper. Adapters cannot fold into a weight: they stay in the exported graph.
- `prefix` (Li & Liang, 2021): a `Prefix` in `GPTClassifier.prefix` gives every layer learned
  keys and values that every token attends to, a learned past; it stays in the exported graph.

LoRA and adapters start from the pretrained model exactly (one factor, or `up`, is zero).
A prefix cannot (any key takes some attention): it starts as the keys and values the
pretrained GPT computes for real tokens, i.e. the model reading a few tokens first.
Wrapped modules keep the base layer's parameter names, so the frozen weights line up with
the pretrained checkpoint and a fine-tuned checkpoint is the base's names plus the new ones.

Our own small module rather than the `peft` library: `peft` brings `transformers` and
`accelerate` along, and its prefix-tuning works on Hugging Face models' caches, not ours.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gptcore.config import ModelConfig, PeftConfig
from gptcore.model import GPT, GPTClassifier, KVCache

ADAPTER_TARGETS = ("attn.proj", "mlp.proj")


class LoRALinear(nn.Linear):
    """An `nn.Linear` (same parameter names, so checkpoints line up) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the pretrained tensors themselves
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
    """An `nn.Embedding` plus a trainable low-rank update of its table: E + (alpha / r) A B.

    A (V, r) starts at zero and B (r, C) random, as the LoRA authors do for embeddings: what
    a passage's words say (in Shakespeare, the characters' names) lives in the table.
    """

    def __init__(self, base: nn.Embedding, rank: int, alpha: float):
        super().__init__(base.num_embeddings, base.embedding_dim, device="meta")
        self.weight = base.weight
        self.lora_a = nn.Parameter(torch.zeros(base.num_embeddings, rank, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.randn(rank, base.embedding_dim, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return super().forward(idx) + F.embedding(idx, self.lora_a) @ self.lora_b * self.scale

    def merged(self) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.weight.device)
        with torch.no_grad():
            embedding.weight.copy_(self.weight + self.scale * (self.lora_a @ self.lora_b))
        return embedding


class AdapterLinear(nn.Linear):
    """An `nn.Linear` (same parameter names) followed by a bottleneck adapter: y + up(gelu(down(y))).

    `up` starts at zero, so the layer starts as the pretrained one; `down` starts as nn.Linear
    does, so `up`'s first gradients are not vanishingly small.
    """

    def __init__(self, base: nn.Linear, size: int):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.down = nn.Linear(base.out_features, size, device=base.weight.device)
        self.up = nn.Linear(size, base.out_features, device=base.weight.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = super().forward(x)
        return y + self.up(F.gelu(self.down(y)))  # (..., size) in the bottleneck


class Prefix(nn.Module):
    """Per layer, P learned keys and values before the tokens: a past every token attends to.

    It starts as the keys and values the pretrained GPT computes for real tokens, as Li &
    Liang's section 7.2 advises: the model reading a few tokens first, in the distribution
    every layer's queries know. It trains directly, not through the MLP reparametrisation Li &
    Liang use against unstable training: on the genre task (bench/peft.py, lr 1e-2) the MLP
    variant did worse (test macro-F1 0.09 against 0.18; a random start 0.20), direct training
    ran smoothly under the fine-tuning warmup and clipping, and there is no MLP to fold away
    before export.
    """

    def __init__(self, cfg: ModelConfig, tokens: int):
        super().__init__()
        shape = (cfg.n_layer, cfg.n_head, tokens, cfg.n_embd // cfg.n_head)  # (L, H, P, D)
        self.keys = nn.Parameter(torch.zeros(shape))
        self.values = nn.Parameter(torch.zeros(shape))

    def forward(self, batch: int) -> KVCache:  # per layer (B, H, P, D) x 2, views of the parameters
        return [
            (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
            for k, v in zip(self.keys.unbind(0), self.values.unbind(0))
        ]

    @torch.no_grad()
    def start_from(self, gpt: GPT, ids: torch.Tensor) -> None:
        """Set the prefix to the keys and values `gpt` computes reading `ids` (P,) at positions 0..P-1."""
        training = gpt.training
        _, present = gpt.eval().hidden_states(ids.unsqueeze(0))  # per layer (1, H, P, D) x 2: no dropout
        gpt.train(training)
        self.keys.copy_(torch.stack([k[0] for k, _ in present]))  # (L, H, P, D)
        self.values.copy_(torch.stack([v[0] for _, v in present]))


def _describe(cfg: PeftConfig) -> dict[str, Any]:
    """The method and what `restore_peft` needs to rebuild its modules: what a checkpoint stores as meta["peft"]."""
    if cfg.method == "lora":
        return {
            "method": "lora",
            "targets": list(cfg.lora_targets),
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
        }
    if cfg.method == "adapter":
        return {"method": "adapter", "size": cfg.adapter_size}
    if cfg.method == "prefix":
        return {"method": "prefix", "tokens": cfg.prefix_tokens}
    return {"method": "full"}


def apply_peft(model: nn.Module, cfg: PeftConfig, trainable: tuple[str, ...] = ()) -> dict[str, Any]:
    """Set `model` (a GPTClassifier or a bare GPT; prefix: classifier only) up for `cfg.method`.

    Adds the method's modules and, unless the method is `full`, freezes everything else except
    the submodules named in `trainable` (e.g. "head"). Returns the description to store in the
    checkpoint meta, for `restore_peft`.
    """
    description = _describe(cfg)
    if cfg.method == "full":
        return description
    model.requires_grad_(False)
    restore_peft(model, description)  # the new modules' parameters are created trainable
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    if cfg.method == "adapter":
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.requires_grad_(True)
    elif cfg.method == "prefix":
        ids = torch.randint(model.gpt.cfg.vocab_size, (cfg.prefix_tokens,), device=model.head.weight.device)
        model.prefix.start_from(model.gpt, ids)
    return description


def restore_peft(model: nn.Module, description: dict[str, Any]) -> nn.Module:
    """Rebuild the modules of the method that `apply_peft` described (in place), ready for `load_weights`."""
    method = description["method"]
    if method == "lora":
        rank, alpha = description["rank"], description["alpha"]
        _wrap(
            model,
            description["targets"],
            (nn.Linear, nn.Embedding),
            lambda base: (
                LoRALinear(base, rank, alpha, description["dropout"])
                if type(base) is nn.Linear
                else LoRAEmbedding(base, rank, alpha)
            ),
        )
    elif method == "adapter":
        _wrap(model, ADAPTER_TARGETS, (nn.Linear,), lambda base: AdapterLinear(base, description["size"]))
    elif method == "prefix":
        if not isinstance(model, GPTClassifier):
            raise ValueError(
                f"prefix-tuning needs a GPTClassifier (it puts the prefix before the passage), "
                f"not a {type(model).__name__}: use lora or adapter for a language model"
            )
        model.prefix = Prefix(model.gpt.cfg, description["tokens"]).to(model.head.weight.device)
    elif method != "full":
        raise ValueError(f"unknown fine-tuning method {method!r}")
    return model


def _wrap(model: nn.Module, targets: list[str] | tuple[str, ...], kinds: tuple[type, ...], make) -> None:
    """Replace every module of exactly one of `kinds` whose dotted name ends with a target by `make(module)`."""
    names = [
        n for n, m in model.named_modules() if type(m) in kinds and any(n == t or n.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no {' or '.join(k.__name__ for k in kinds)} layer matches the targets {list(targets)}")
    for name in names:
        _replace(model, name, make(model.get_submodule(name)))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and restore plain layers (in place); all trainable again.

    Adapters and a prefix stay as they are: they are ordinary modules of the exported graph.
    """
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
