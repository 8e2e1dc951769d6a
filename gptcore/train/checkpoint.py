"""Resumable checkpoints: the weights (`gptcore.weights`) plus state loadable with `weights_only=True`.

    DIR/step_000120/model.safetensors   the weights (tied tensors stored once)
    DIR/step_000120/model.json          what to build: model config, kind, labels
    DIR/step_000120/state.pt            optimizer, scheduler, step, data sampler, every rank's RNG states
    DIR/step_000120/COMPLETE            written last: a directory without it never counts

Each checkpoint is written to a temporary directory and renamed into place, so a crash during
a save leaves the previous checkpoint as the latest. Only the newest `keep` are kept.

A resume (`resume_point`) takes the newest checkpoint that reads back, warning about any newer
one that is marked complete but does not (a truncated file, corrupt JSON), and refuses one
written by other work: another model, other data, or training settings outside
`RESUME_MAY_CHANGE`, each differing field named.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptcore.errors import ConfigError, InputError
from gptcore.fsutil import atomic_dir, read_json
from gptcore.weights import META_FILE, WEIGHTS_FILE, write_weights

log = logging.getLogger("gptcore.train")

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_FILE = "state.pt"

# Training fields a resumed run may change, because none changes what the steps already taken
# meant: when to stop (max_steps and time_budget_s: the LR schedule then ends at the new last
# step; patience), how often to evaluate, log and checkpoint and how many checkpoints to keep,
# where and how the same arithmetic runs (device, compile, ddp or fsdp, the peak for MFU), and
# what happens after training (a stage's `enabled`; SFT's sampling of example answers). Any other
# field (the optimizer, the LR, the batch, nproc_per_node (the global batch), the seed, the PEFT
# method, the data fields) must equal the checkpoint's.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps",
        "time_budget_s",
        "patience",
        "eval_interval",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "device",
        "compile",
        "parallelism",
        "peak_tflops",
        "enabled",
        "samples",
        "max_new_tokens",
        "temperature",
        "top_k",
    }
)
# What reading a checkpoint raises when a file of it is truncated, corrupt or missing.
UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError)


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
        torch.save({**state, "step": step}, tmp / STATE_FILE)
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
    return load_file(str(path / WEIGHTS_FILE)), torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def resume_point(
    ckpt_dir: str | Path, name: str, meta: dict[str, Any], config: dict[str, Any]
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(checkpoint, weights, state) of the newest checkpoint that reads back, checked to be this
    run's work (`meta`: the model and data digests, `config`: the stage `name`'s training fields);
    None when there is no complete checkpoint."""
    complete = complete_checkpoints(ckpt_dir)
    for path in reversed(complete):
        try:
            weights, state = read_checkpoint(path)
            saved_meta = read_json(path / META_FILE)
        except UNREADABLE as e:
            log.warning(
                "%s: checkpoint %s is marked complete but unreadable (%s: %s); trying the one before",
                name,
                path,
                type(e).__name__,
                e,
            )
            continue
        check_same_work(path, name, saved_meta, state.get("config"), meta, config)
        return path, weights, state
    if complete:
        raise InputError(
            f"{ckpt_dir}: none of the complete checkpoints ({', '.join(p.name for p in complete)}) is readable; "
            "run without --resume to start over"
        )
    return None


def check_same_work(
    path: Path,
    name: str,
    saved_meta: dict[str, Any],
    saved_config: dict[str, Any] | None,
    meta: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """Raise ConfigError (a training field differs) or InputError (the model or data do), naming
    each field, if the checkpoint at `path` was written by other work than this run's."""
    # model.json went through JSON: compare this run's description as it would read back.
    data = _differences("", saved_meta, json.loads(json.dumps(meta)))
    if saved_config is None:  # written before checkpoints recorded their settings
        log.warning("%s: checkpoint %s records no training settings; only its model and data are checked", name, path)
        settings = []
    else:
        settings = [
            f"{name}.{key}: checkpoint has {saved_config[key]!r}, config has {config[key]!r}"
            for key in sorted((config.keys() & saved_config.keys()) - RESUME_MAY_CHANGE)
            if saved_config[key] != config[key]
        ]
    if settings or data:
        error = ConfigError if settings else InputError
        raise error(
            f"{path}: cannot resume from a checkpoint of other work: {'; '.join(settings + data)} "
            "(restore these, or run without --resume to start over)"
        )


def _differences(prefix: str, saved: Any, current: Any) -> list[str]:
    """'key.sub: checkpoint has X, this run has Y' for each leaf that differs (keys in both only:
    a field added to model.json since the checkpoint was written does not block it)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            line
            for key in sorted(saved.keys() & current.keys())
            for line in _differences(f"{prefix}{key}.", saved[key], current[key])
        ]
    if saved == current:
        return []
    return [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, this run has {current!r}"]
