"""A model's weights on disk: safetensors plus model.json, what every stage after training reads.

    DIR/model.safetensors   the weights (tied tensors stored once)
    DIR/model.json          what to build: model config, kind, labels, the PEFT modules, digests

No pickle: weights load without executing code. Training's resumable checkpoints
(`gptcore.train.checkpoint`) add their optimizer and sampler state beside these two files.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file

from gptcore.config import ModelConfig
from gptcore.errors import InputError
from gptcore.fsutil import atomic_dir, read_json, sha256_file, write_json
from gptcore.model import GPT, GPTClassifier
from gptcore.peft import merge_peft, restore_peft

WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{name: name it aliases} for tied parameters; the kept name is the first in sorted order, as safetensors keeps."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in _unwrap(model).named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return {alias: min(names) for names in groups.values() for alias in names if alias != min(names)}


def without_aliases(weights: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """A state dict as it is written: on the CPU, contiguous, each tied tensor once."""
    return {k: v.detach().cpu().contiguous() for k, v in weights.items() if k not in aliases}


def with_aliases(weights: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    return {**weights, **{alias: weights[kept] for alias, kept in aliases.items()}}


def save_weights(weights: dict[str, torch.Tensor], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Weights + model.json into `out_dir` (replaced atomically)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_weights(weights, tmp, meta)
    return out_dir


def write_weights(weights: dict[str, torch.Tensor], directory: Path, meta: dict[str, Any]) -> None:
    """Weights + model.json into an existing directory (the caller makes it appear atomically)."""
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(directory / META_FILE, meta)


def load_weights(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(f"{path}: no weights here")
    missing, unexpected = load_model(_unwrap(model), str(path), strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise InputError(f"{path}: no model description here; is {directory} a gptcore checkpoint?")
    return read_json(path)


def checkpoint_source(directory: str | Path) -> dict[str, str]:
    """Where an exported model came from: the checkpoint directory and its weights' sha256, so the
    registry can attach those very weights to the version (or refuse ones fine-tuned since)."""
    directory = Path(directory).resolve()
    return {"dir": str(directory), "weights_sha256": sha256_file(directory / WEIGHTS_FILE)}


def load_classifier(directory: str | Path) -> tuple[GPTClassifier, dict[str, Any]]:
    """A fine-tuned classifier from a directory of weights + model.json."""
    meta = read_meta(directory)
    if meta.get("kind") != "classifier":
        raise InputError(f"{directory}: holds a {meta.get('kind')!r} model, not a classifier")
    model = GPTClassifier(GPT(ModelConfig(**meta["model"])), len(meta["labels"]))
    restore_peft(model, meta.get("peft", {"method": "full"}))  # the modules as trained; LoRA then merged
    return merge_peft(load_weights(model, directory)).eval(), meta


def load_lm(directory: str | Path, vocab_size: int | None = None) -> tuple[GPT, dict[str, Any]]:
    """A language model from a directory of weights + model.json; with `vocab_size`, its vocabulary
    grown to that many ids (tokens added to its tokenizer since, e.g. a chat template's)."""
    meta = read_meta(directory)
    if meta.get("kind") != "lm":
        raise InputError(f"{directory}: holds a {meta.get('kind')!r} model, not a language model")
    model = restore_peft(GPT(ModelConfig(**meta["model"])), meta.get("peft", {"method": "full"}))
    model = merge_peft(load_weights(model, directory)).eval()
    if vocab_size is not None:
        model.grow_vocab(vocab_size)
    return model, meta


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
