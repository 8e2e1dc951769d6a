"""Resumable checkpoints: weights in safetensors, the rest loadable with `weights_only=True`.

    DIR/step_000120/model.safetensors   the weights (tied tensors stored once)
    DIR/step_000120/model.json          what to build: model config, kind, labels
    DIR/step_000120/state.pt            optimizer, scheduler, step, data sampler, every rank's RNG states
    DIR/step_000120/COMPLETE            written last: a directory without it never counts

Each checkpoint is written to a temporary directory and renamed into place, so a crash during
a save leaves the previous checkpoint as the latest. Only the newest `keep` are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file

from gptcore.config import ModelConfig
from gptcore.errors import InputError
from gptcore.fsutil import atomic_dir, read_json, sha256_file, write_json
from gptcore.model import GPT, GPTClassifier
from gptcore.peft import merge_peft, restore_peft

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


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
    """Weights + model.json into `out_dir` (replaced atomically): the unit that export reads."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        _write_weights(weights, tmp, meta)
    return out_dir


def _write_weights(weights: dict[str, torch.Tensor], directory: Path, meta: dict[str, Any]) -> None:
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json(directory / "model.json", meta)


def load_weights(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise InputError(f"{path}: no weights here")
    missing, unexpected = load_model(_unwrap(model), str(path), strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise InputError(f"{path}: no model description here; is {directory} a gptcore checkpoint?")
    return read_json(path)


def checkpoint_source(directory: str | Path) -> dict[str, str]:
    """Where an exported model came from: the checkpoint directory and its weights' sha256, so the
    registry can attach those very weights to the version (or refuse ones fine-tuned since)."""
    directory = Path(directory).resolve()
    return {"dir": str(directory), "weights_sha256": sha256_file(directory / "model.safetensors")}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def save_checkpoint(
    ckpt_dir: str | Path, step: int, weights: dict[str, torch.Tensor], meta: dict[str, Any], state: dict[str, Any],
    keep: int,
) -> Path:
    final = Path(ckpt_dir) / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        _write_weights(weights, tmp, meta)
        torch.save({**state, "step": step}, tmp / "state.pt")
        (tmp / MARKER).write_text("ok\n")
    for old in complete_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # What a process killed mid-save left: never a checkpoint (no final name), safe to drop now.
    for stale in Path(ckpt_dir).glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint directories that finished writing, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights as written, training state): nothing applied yet."""
    path = Path(path)
    return load_file(str(path / "model.safetensors")), torch.load(path / "state.pt", map_location="cpu",
                                                                 weights_only=True)


def load_classifier(directory: str | Path) -> tuple[GPTClassifier, dict[str, Any]]:
    """A fine-tuned classifier from a directory of weights + model.json."""
    meta = read_meta(directory)
    if meta.get("kind") != "classifier":
        raise InputError(f"{directory}: holds a {meta.get('kind')!r} model, not a classifier")
    model = GPTClassifier(GPT(ModelConfig(**meta["model"])), len(meta["labels"]))
    restore_peft(model, meta.get("peft", {"method": "full"}))  # the modules as trained; LoRA then merged
    return merge_peft(load_weights(model, directory)).eval(), meta


def load_lm(directory: str | Path) -> tuple[GPT, dict[str, Any]]:
    meta = read_meta(directory)
    if meta.get("kind") != "lm":
        raise InputError(f"{directory}: holds a {meta.get('kind')!r} model, not a language model")
    model = restore_peft(GPT(ModelConfig(**meta["model"])), meta.get("peft", {"method": "full"}))
    return merge_peft(load_weights(model, directory)).eval(), meta


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
