"""The GPT: a decoder-only transformer in the GPT-2/GPT-3 shape, in one readable file.

Token + learned position embeddings, `n_layer` pre-LN blocks of causal self-attention and a
GELU MLP, a final LayerNorm and an LM head tied to the token embedding. Options that current
small-model trainers use swap single parts (ModelConfig: rotary positions, RMSNorm, QK-norm,
squared-ReLU or SwiGLU MLP, untied head); the defaults are GPT-2's. Shapes are written
next to every tensor: B batch, T new tokens, P cached (past) tokens, S = P + T, C = n_embd,
H = n_head, D = C // H, V = vocab_size padded up to a multiple of 64 (the extra rows are
never targets: they only make the embedding and LM-head matmuls tile well on GPUs).

The same forward serves training (no cache, no mask: the fast causal path of
`scaled_dot_product_attention`), batched generation with left padding (attention mask +
position ids + a cache that grows by concatenation) and the ONNX export, which traces the
fixed cache: a (B, H, W, D) buffer per layer where each token's keys and values are written at
its position (slot p holds position p), so a decode step writes T new slots instead of copying
the cache, and each row attends to the slots up to its own position (ragged rows need no padding). Every loss and
score goes through `token_nll`: the softmax over the tokenizer's V ids, never the padding rows.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptcore.config import ModelConfig
from gptcore.metrics import IGNORE_INDEX

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each (B, H, P, D)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, bias=cfg.bias) if cfg.norm == "layernorm" else nn.RMSNorm(dim)


def rope_angles(position_ids: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions -> cos, sin of shape (B, 1, T, D/2) for rotary embeddings."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, D/2)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate each (x1, x2) pair of halves of (B, H, T, D) by its position's angle."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        D = cfg.n_embd // cfg.n_head
        self.q_norm = nn.RMSNorm(D) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(D) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        past: tuple[torch.Tensor, torch.Tensor] | None,  # (B, H, P, D) each
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = may attend; None = plain causal
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin (B, 1, T, D/2) of the new tokens
        slots: torch.Tensor | None = None,  # (B, T) where a fixed cache (B, H, W, D) takes the new tokens
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = self.q_norm(q.view(B, T, self.n_head, C // self.n_head)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(k.view(B, T, self.n_head, C // self.n_head)).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        if rope is not None:  # the cache holds keys already rotated to their positions
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if slots is not None:  # written in place: the buffer's other slots are not copied
            index = slots[:, None, :, None].expand(B, self.n_head, T, C // self.n_head)  # (B, H, T, D)
            k = past[0].scatter(2, index, k)  # (B, H, W, D)
            v = past[1].scatter(2, index, v)  # (B, H, W, D)
        elif past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, S, D)
            v = torch.cat([past[1], v], dim=2)  # (B, H, S, D)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        # SwiGLU has two input matrices: 8/3 of the width keeps the parameter count of 4x.
        hidden = 4 * cfg.n_embd if cfg.mlp != "swiglu" else 8 * math.ceil(cfg.n_embd / 3)
        self.fc = nn.Linear(cfg.n_embd, hidden * (2 if cfg.mlp == "swiglu" else 1), bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, past, mask, rope=None, slots=None):
        a, present = self.attn(self.ln_1(x), past, mask, rope, slots)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def attention_mask_4d(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, S) 0/1 padding mask -> (B, 1, T, S) bool mask, causal over the last T positions.

    Every query may also attend to itself: a left-padding query would otherwise see no key at
    all, and the softmax of an all-masked row is NaN, which then leaks into other rows through
    the NaN keys and values of later layers.
    """
    S = attention_mask.shape[1]
    past = S - new_tokens
    q_pos = torch.arange(new_tokens, device=attention_mask.device).unsqueeze(1) + past  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device).unsqueeze(0)  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    keep = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return keep | (k_pos == q_pos)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    return -(-vocab_size // multiple) * multiple


def token_nll(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., V padded) logits, (...) next-token ids -> (...) NLL in nats, 0 where the target is IGNORE_INDEX.

    The softmax runs over the tokenizer's `vocab_size` ids only, as the exported graph's logits
    do, so training, evaluation and ONNX Runtime (`gptcore.metrics.token_nll`) score one distribution.
    """
    logits = logits[..., :vocab_size].float()
    nll = F.cross_entropy(
        logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int, temperature: float):
    """(..., V padded) logits of a student and its teacher -> (...) KL(teacher || student) per token.

    Both softened by `temperature` over the tokenizer's ids, as `token_nll` scores them, and scaled
    by its square so the gradients keep their size whatever the temperature (Hinton et al., 2015).
    """
    student = F.log_softmax(student_logits[..., :vocab_size].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[..., :vocab_size].float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1) * temperature**2


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V = padded_vocab_size(cfg.vocab_size)
        self.wte = nn.Embedding(V, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: one (V, C) matrix embeds and unembeds
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights, 12·L·H·Q·T for attention (PaLM, appendix B).

        N excludes the position table, a lookup that does no multiply-adds.
        """
        cfg = self.cfg
        n = self.num_parameters() - (self.wpe.weight.numel() if self.wpe is not None else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> None:
        """Take `vocab_size` ids (new special tokens, e.g. a chat template's): new rows are the mean embedding."""
        old = self.cfg.vocab_size
        if vocab_size <= old:
            return
        rows = padded_vocab_size(vocab_size)
        for module in (self.wte,) if self.cfg.tie_embeddings else (self.wte, self.lm_head):
            weight = module.weight  # (V, C)
            if rows > weight.shape[0]:  # past the padding rows: a bigger table
                grown = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
                grown[: weight.shape[0]] = weight
                module.weight = nn.Parameter(grown)
            module.weight[old:vocab_size] = module.weight[:old].mean(dim=0)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.cfg = dataclasses.replace(self.cfg, vocab_size=vocab_size)

    def hidden_states(
        self,
        idx: torch.Tensor,  # (B, T) token ids
        position_ids: torch.Tensor | None = None,  # (B, T); default 0..T-1 (after the cache)
        attention_mask: torch.Tensor | None = None,  # (B, S) 0/1; None = no padding
        past: KVCache | None = None,
        fixed_cache: bool = False,  # past is a fixed (B, H, W, D) buffer, written at position_ids
    ) -> tuple[torch.Tensor, KVCache]:
        B, T = idx.shape
        P = 0 if past is None else past[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=idx.device).unsqueeze(0)  # (1, T)
        # A cache or padding needs an explicit mask; plain training takes the fused causal path.
        mask, slots = None, None
        if fixed_cache:  # a query at position p sees slots 0..p of its row, itself included
            slots = position_ids.expand(B, T)
            mask = (torch.arange(P, device=idx.device) <= slots[..., None])[:, None]  # (B, 1, T, W)
        elif attention_mask is not None or past is not None:
            if attention_mask is None:
                attention_mask = torch.ones(B, P + T, dtype=torch.long, device=idx.device)
            mask = attention_mask_4d(attention_mask, T)  # (B, 1, T, S)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope = rope_angles(position_ids.expand(B, T), self.cfg.n_embd // self.cfg.n_head)
        x = self.drop(x)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i], mask, rope, slots)
            present.append(kv)
        return self.ln_f(x), present  # (B, T, C), per layer (B, H, S, D) x 2

    def forward(
        self,
        idx: torch.Tensor,  # (B, T)
        targets: torch.Tensor | None = None,  # (B, T) next-token ids, IGNORE_INDEX = no loss
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, _ = self.hidden_states(idx, **kwargs)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:  # the mean over the targets that carry loss
            loss = token_nll(logits, targets, self.cfg.vocab_size).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,  # (B, T0) prompt ids
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # (B, T0 + max_new_tokens)
        """Sample with the KV cache; temperature 0 is greedy. The context slides past block_size."""
        past: KVCache | None = None
        pos = 0
        step_ids = idx[:, -self.cfg.block_size :]
        for _ in range(max_new_tokens):
            T = step_ids.shape[1]
            if pos + T > self.cfg.block_size:  # cache full: restart from the latest window
                past, pos = None, 0
                step_ids = idx[:, -self.cfg.block_size :]
                T = step_ids.shape[1]
            positions = torch.arange(pos, pos + T, device=idx.device).unsqueeze(0)
            h, past = self.hidden_states(step_ids, position_ids=positions, past=past)
            pos += T
            logits = self.lm_head(h[:, -1, :])[:, : self.cfg.vocab_size]  # (B, vocab): never a padding id
            next_id = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            step_ids = next_id
        return idx


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:  # (B, V) -> (B, 1)
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class GPTClassifier(nn.Module):
    """The GPT body plus a linear head over the hidden state of the last non-pad token.

    Inputs are right-padded, so causal attention already keeps padding out of every real
    position: the mask only tells which position to pool.

    `prefix` (prefix-tuning, set by gptcore.peft) maps the batch size to a learned past, per
    layer (B, H, P, D) keys and values that every token attends to. The prefix takes no
    positions: the tokens keep 0..T-1, as in pretraining.
    """

    def __init__(self, gpt: GPT, num_classes: int):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.cfg.n_embd, num_classes)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.prefix: nn.Module | None = None

    def forward(
        self,
        idx: torch.Tensor,  # (B, T) right-padded token ids
        attention_mask: torch.Tensor,  # (B, T) 1 for real tokens
    ) -> torch.Tensor:  # (B, num_classes)
        B, T = idx.shape
        past = None if self.prefix is None else self.prefix(B)  # per layer (B, H, P, D) x 2
        positions = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T), whatever P
        h, _ = self.gpt.hidden_states(idx, position_ids=positions, past=past)  # (B, T, C)
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)  # (B,)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        return self.head(pooled)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with `pad_id`, (B, T) mask of real tokens: the classifier's inputs."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def classify(model: GPTClassifier, sequences: list[list[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """(N, K) class probabilities of token-id sequences (passages, or texts as scoring reads them)."""
    device = next(model.parameters()).device
    probs = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[i : i + batch_size], pad_id)
        probs.append(F.softmax(model(ids.to(device), mask.to(device)).float(), dim=-1).cpu().numpy())
    return np.concatenate(probs)


@torch.no_grad()
def sequence_nll(model: GPT, inputs: np.ndarray, targets: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, T) ids and next-token targets (IGNORE_INDEX: not scored) -> (N, T) NLL in nats, 0 where not scored."""
    device = next(model.parameters()).device
    nll = []
    for i in range(0, len(inputs), batch_size):
        logits, _ = model(torch.as_tensor(inputs[i : i + batch_size], device=device))
        y = torch.as_tensor(targets[i : i + batch_size], device=device)
        nll.append(token_nll(logits, y, model.cfg.vocab_size).cpu().numpy())
    return np.concatenate(nll).astype(np.float64)
