"""Resumable checkpoints: the weights (`gptcore.weights`) plus state loadable with `weights_only=True`.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from gptcore.fsutil import atomic_dir
from gptcore.weights import WEIGHTS_FILE, write_weights

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


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
    ckpt_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    final = Path(ckpt_dir) / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        write_weights(weights, tmp, meta)
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
    return load_file(str(path / WEIGHTS_FILE)), torch.load(path / "state.pt", map_location="cpu", weights_only=True)
