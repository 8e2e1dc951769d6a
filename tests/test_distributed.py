"""Data parallelism through torch.distributed (gloo on CPU) under torchrun: two real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.test_resume import ENV

CONFIG = """
model: {{block_size: 32, n_layer: 2, n_head: 2, n_embd: 32}}
pretrain: {{max_steps: 20, batch_size: 8, grad_accum_steps: {accum}, warmup_steps: 2, eval_interval: 20,
           eval_batches: 2, log_interval: 1, checkpoint_interval: 20, device: cpu}}
finetune: {{passage_tokens: 16}}
"""


def run(w: Path, small_corpus, accum: int, nproc: int) -> list[float]:
    w.mkdir()
    shutil.copytree(small_corpus["tokenizer"], w / "tokenizer")
    (w / "c.yaml").write_text(CONFIG.format(accum=accum))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "gptcore.cli", "pretrain", "--workdir", str(w), "--config", str(w / "c.yaml"), "--no-tracking"]
    proc = subprocess.run(cmd, env=ENV, cwd=w, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (w / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def test_two_ranks_match_one_process_with_twice_the_accumulation(small_corpus, tmp_path):
    ddp = run(tmp_path / "ddp", small_corpus, accum=1, nproc=2)
    single = run(tmp_path / "single", small_corpus, accum=2, nproc=1)
    assert len(ddp) == len(single) == 20
    for step, (a, b) in enumerate(zip(ddp, single), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: 2 ranks {a} vs 1 process {b}"
    assert ddp[-1] < ddp[0]  # and it learns
