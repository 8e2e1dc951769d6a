"""Hugging Face interop: a gptcore GPT as a `transformers` GPT-2 checkpoint, with its tokenizer.

    OUT/model.safetensors          GPT2LMHeadModel's weights (no pickle)
    OUT/config.json                its GPT2Config
    OUT/generation_config.json     the end-of-text (a chat model: also end-of-turn) and pad ids
    OUT/tokenizer.json             the tokenizer the model was trained with
    OUT/tokenizer_config.json      for PreTrainedTokenizerFast: special tokens, context length,
    OUT/special_tokens_map.json    and (a chat model) the chat template and its tokens

`GPT2LMHeadModel.from_pretrained(OUT)` and `PreTrainedTokenizerFast.from_pretrained(OUT)` load it;
nothing here imports `transformers`, so exporting needs only torch and safetensors.

What maps onto GPT-2: learned positions, LayerNorm, the tanh-approximated GELU MLP (`gelu_new`),
dropout (the three pdrops), a tied or an untied head (`tie_word_embeddings`), no biases (written as
zero biases: the same function), a LoRA fine-tune (merged into the weights on loading). The
embedding's padding rows are dropped: the HF model has exactly the tokenizer's ids. HF's Conv1D
stores (in, out), the transpose of nn.Linear's (out, in).

What does not map, and is refused with a ConfigError naming each option: rotary positions
(`position: rope`), RMSNorm (`norm: rmsnorm`), QK-norm (`qk_norm: true`), a squared-ReLU or
SwiGLU MLP (`mlp: relu2 | swiglu`), and adapters (`peft.method: adapter`: extra modules that
GPT-2 has no place for).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gptcore.config import ModelConfig
from gptcore.errors import ConfigError, InputError
from gptcore.fsutil import atomic_dir, write_json
from gptcore.layout import EOT, PAD, RESULT_FILE, TOKENIZER_FILE
from gptcore.model import GPT
from gptcore.results import load_pretrained, load_sft, load_tokenizer
from gptcore.runtime.template import CHAT_TOKENS, END, HF_CHAT_TEMPLATE
from gptcore.weights import WEIGHTS_FILE, load_lm

# ModelConfig fields GPT-2 can express, and the one value each must have.
GPT2_ONLY = {"position": "learned", "norm": "layernorm", "qk_norm": False, "mlp": "gelu"}


def unmapped_options(cfg: ModelConfig, meta: dict[str, Any]) -> list[str]:
    """`field=value` for each option of the model that GPT2LMHeadModel cannot express."""
    options = [f"model.{name}={getattr(cfg, name)!r}" for name, gpt2 in GPT2_ONLY.items() if getattr(cfg, name) != gpt2]
    method = meta.get("peft", {"method": "full"})["method"]
    if method not in ("full", "lora"):  # LoRA is folded into the weights by load_lm; adapters stay modules
        options.append(f"peft.method={method!r}")
    return options


def hf_state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors from the GPT's: Conv1D layout, the tokenizer's ids only, zeros for absent biases."""
    cfg, V = gpt.cfg, gpt.cfg.vocab_size

    def linear(prefix: str, layer: torch.nn.Linear) -> dict[str, torch.Tensor]:
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        return {f"{prefix}.weight": layer.weight.t(), f"{prefix}.bias": bias}  # Conv1D: (in, out)

    def norm(prefix: str, layer: torch.nn.LayerNorm) -> dict[str, torch.Tensor]:
        bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight)
        return {f"{prefix}.weight": layer.weight, f"{prefix}.bias": bias}

    tensors = {"transformer.wte.weight": gpt.wte.weight[:V], "transformer.wpe.weight": gpt.wpe.weight}
    for i, block in enumerate(gpt.blocks):
        h = f"transformer.h.{i}"
        tensors |= norm(f"{h}.ln_1", block.ln_1) | norm(f"{h}.ln_2", block.ln_2)
        tensors |= linear(f"{h}.attn.c_attn", block.attn.qkv) | linear(f"{h}.attn.c_proj", block.attn.proj)
        tensors |= linear(f"{h}.mlp.c_fc", block.mlp.fc) | linear(f"{h}.mlp.c_proj", block.mlp.proj)
    tensors |= norm("transformer.ln_f", gpt.ln_f)
    if not cfg.tie_embeddings:  # tied, transformers ties lm_head to wte itself: the tensor is stored once
        tensors["lm_head.weight"] = gpt.lm_head.weight[:V]
    return {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}


def gpt2_config(cfg: ModelConfig, eot_id: int, pad_id: int) -> dict[str, Any]:
    """config.json of GPT2LMHeadModel for `cfg` (GPT2Config's fields, written without transformers)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as gptcore's GELU MLP
        "activation_function": "gelu_new",  # GELU's tanh approximation, F.gelu(approximate="tanh")
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(D), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def tokenizer_config(tok, chat: bool, block_size: int) -> dict[str, Any]:
    """tokenizer_config.json for PreTrainedTokenizerFast over `tok` (a `tokenizers.Tokenizer`)."""
    needed = [EOT, PAD, *(CHAT_TOKENS if chat else [])]
    missing = [t for t in needed if tok.token_to_id(t) is None]
    if missing:
        hint = " (a chat model's tokenizer is the sft stage's tokenizer.json)" if chat else ""
        raise InputError(f"the tokenizer has no {', '.join(missing)} token{hint}")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes to the exact text
    }
    if chat:
        config |= {"chat_template": HF_CHAT_TEMPLATE, "additional_special_tokens": CHAT_TOKENS}
    return config


def write_hf_tokenizer_files(tokenizer_json_path: str | Path, out_dir: str | Path, block_size: int, chat: bool) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir` (the caller's
    directory, made to appear atomically): what PreTrainedTokenizerFast.from_pretrained reads."""
    source, out_dir = Path(tokenizer_json_path), Path(out_dir)
    config = tokenizer_config(load_tokenizer(source), chat, block_size)
    shutil.copyfile(source / TOKENIZER_FILE if source.is_dir() else source, out_dir / TOKENIZER_FILE)
    write_json(out_dir / "tokenizer_config.json", config)
    special = ("bos_token", "eos_token", "pad_token", "additional_special_tokens")
    write_json(out_dir / "special_tokens_map.json", {k: config[k] for k in special if k in config})


def export_hf(model_dir: str | Path, tokenizer_json: str | Path, out_dir: str | Path, chat: bool) -> Path:
    """The language model in checkpoint `model_dir` as a transformers GPT-2 checkpoint in `out_dir`
    (replaced atomically); ConfigError naming each option GPT-2 cannot express."""
    gpt, meta = load_lm(model_dir)
    unmapped = unmapped_options(gpt.cfg, meta)
    if unmapped:
        raise ConfigError(
            f"{model_dir}: GPT2LMHeadModel cannot express {', '.join(unmapped)}; "
            "export --format hf takes the GPT-2 recipe (learned positions, LayerNorm, GELU, no QK-norm): "
            "train it with --preset default-gpt2, or those model fields in a config"
        )
    tok = load_tokenizer(tokenizer_json)
    if tok.get_vocab_size() != gpt.cfg.vocab_size:
        raise InputError(
            f"{tokenizer_json}: {tok.get_vocab_size()} token ids, but the model in {model_dir} has "
            f"{gpt.cfg.vocab_size}: not the tokenizer it was trained with"
        )
    eot_id, pad_id = tok.token_to_id(EOT), tok.token_to_id(PAD)
    # A chat model's answer ends with <|end|>: generation stops there, or at end of text.
    eos_ids = [tok.token_to_id(END), eot_id] if chat else eot_id
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_hf_tokenizer_files(tokenizer_json, tmp, gpt.cfg.block_size, chat)  # first: it checks the special tokens
        save_file(hf_state_dict(gpt), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / "config.json", gpt2_config(gpt.cfg, eot_id, pad_id))
        write_json(
            tmp / "generation_config.json", {"bos_token_id": eot_id, "eos_token_id": eos_ids, "pad_token_id": pad_id}
        )
    return out_dir


def export_hf_stage(
    pretrained_dir: str | Path,
    tokenized_dir: str | Path,
    sft_dir: str | Path,
    lm_out: str | Path,
    chat_out: str | Path,
    chat: bool = True,
) -> dict[str, str | None]:
    """The pretrained LM (its best checkpoint, the tokenizer stage's tokenizer) into `lm_out`, and,
    when the sft stage has run and `chat`, the chat model with its tokenizer into `chat_out`."""
    lm = export_hf(load_pretrained(pretrained_dir).best_dir, Path(tokenized_dir) / TOKENIZER_FILE, lm_out, chat=False)
    written: dict[str, str | None] = {"lm": str(lm), "chat": None}
    if chat and (Path(sft_dir) / RESULT_FILE).is_file():
        sft = load_sft(sft_dir)
        written["chat"] = str(export_hf(sft.best_dir, sft.tokenizer_path, chat_out, chat=True))
    return written
