"""Crash and resume for real: processes killed with SIGKILL mid-run and mid-save, then resumed.

Each run is a separate `gptcore pretrain` process with the same settings, so the per-step
losses in OUT/metrics.jsonl can be compared exactly (deterministic CPU settings).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptcore.train.checkpoint import latest_checkpoint
from tests.conftest import SUBPROCESS_ENV as ENV

MAX_STEPS = 300
CONFIG = f"""
model: {{block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, dropout: 0.1}}
pretrain: {{max_steps: {MAX_STEPS}, batch_size: 8, warmup_steps: 10, eval_interval: 100, eval_batches: 2,
           log_interval: 1, checkpoint_interval: 20, keep_checkpoints: 3, device: cpu}}
finetune: {{passage_tokens: 16}}
"""
# Kills its own process the second time the trainer saves checkpoint state.
DIE_IN_SECOND_SAVE = """
import os, signal, sys
import torch
real_save, calls = torch.save, []
def save(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(*args, **kwargs)
torch.save = save
from gptcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def workdir_for(name: str, root: Path, small_corpus) -> Path:
    w = root / name
    w.mkdir()
    shutil.copytree(small_corpus["tokenizer"], w / "tokenizer")
    (w / "config.yaml").write_text(CONFIG)
    return w


def pretrain_cmd(w: Path, *extra: str) -> list[str]:
    return ["pretrain", "--workdir", str(w), "--config", str(w / "config.yaml"), "--no-tracking", *extra]


def run_cli(w: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gptcore.cli", *pretrain_cmd(w, *extra)], env=ENV, check=True, capture_output=True, cwd=w
    )


def step_losses(w: Path) -> dict[int, float]:
    lines = (w / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory) -> dict[int, float]:
    w = workdir_for("straight", tmp_path_factory.mktemp("resume"), small_corpus)
    run_cli(w)
    losses = step_losses(w)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


def test_sigkill_mid_run_then_resume_gives_the_same_losses(small_corpus, tmp_path, uninterrupted):
    w = workdir_for("killed", tmp_path, small_corpus)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcore.cli", *pretrain_cmd(w)],
        env=ENV,
        cwd=w,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while latest_checkpoint(w / "pretrain" / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done_before_kill = max(step_losses(w))
    assert done_before_kill < MAX_STEPS, "the run finished before it could be killed"

    run_cli(w, "--resume")
    resumed = step_losses(w)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    assert resumed == uninterrupted  # every step, bit for bit, including those redone after the kill


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(small_corpus, tmp_path, uninterrupted):
    w = workdir_for("killed_saving", tmp_path, small_corpus)
    proc = subprocess.run(
        [sys.executable, "-c", DIE_IN_SECOND_SAVE, *pretrain_cmd(w)], env=ENV, cwd=w, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL
    ckpts = w / "pretrain" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_000020"
    assert not (ckpts / "step_000040").exists()  # the half-written one never took the name

    run_cli(w, "--resume")
    assert step_losses(w) == uninterrupted
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")], "temporary directories left behind"
