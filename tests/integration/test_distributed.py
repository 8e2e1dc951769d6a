"""Data parallelism through torch.distributed (gloo on CPU) under torchrun: two real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import SUBPROCESS_ENV as ENV

CONFIG = """
model: {{block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, dropout: {dropout}}}
pretrain: {{max_steps: 20, batch_size: 8, grad_accum_steps: {accum}, warmup_steps: 2, eval_interval: 20,
           eval_batches: 2, log_interval: 1, checkpoint_interval: 10, keep_checkpoints: 2, device: cpu,
           parallelism: {parallelism}}}
finetune: {{passage_tokens: 16}}
"""


def run(
    w: Path, small_corpus, accum: int, nproc: int, dropout: float = 0.0, resume: bool = False, parallelism: str = "ddp"
) -> list[float]:
    if not resume:
        w.mkdir()
        shutil.copytree(small_corpus["tokenizer"], w / "tokenizer")
        (w / "c.yaml").write_text(CONFIG.format(accum=accum, dropout=dropout, parallelism=parallelism))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "gptcore.cli",
        "pretrain",
        "--preset",
        "default-gpt2",  # AdamW: FSDP refuses Muon
        "--workdir",
        str(w),
        "--config",
        str(w / "c.yaml"),
        "--no-tracking",
        *(["--resume"] if resume else []),
    ]
    proc = subprocess.run(cmd, env=ENV, cwd=w, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (w / "log.txt").write_text(proc.stderr)
    records = [json.loads(line) for line in (w / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def test_two_ranks_match_one_process_with_twice_the_accumulation(small_corpus, tmp_path):
    ddp = run(tmp_path / "ddp", small_corpus, accum=1, nproc=2)
    single = run(tmp_path / "single", small_corpus, accum=2, nproc=1)
    assert len(ddp) == len(single) == 20
    for step, (a, b) in enumerate(zip(ddp, single), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: 2 ranks {a} vs 1 process {b}"
    assert ddp[-1] < ddp[0]  # and it learns


def resume_from_step_10(straight: Path, w: Path, small_corpus, nproc: int) -> list[float]:
    """Steps 11..20 of the run in `straight`, resumed in `w` from its step-10 checkpoint."""
    w.mkdir()
    shutil.copytree(straight / "tokenizer", w / "tokenizer")
    shutil.copy(straight / "c.yaml", w / "c.yaml")
    ckpt = w / "pretrain" / "checkpoints" / "step_000010"
    shutil.copytree(straight / "pretrain" / "checkpoints" / "step_000010", ckpt)
    return run(w, small_corpus, accum=1, nproc=nproc, resume=True)


def test_two_ranks_resume_exactly_with_dropout(small_corpus, tmp_path):
    """Each rank's RNG stream is in the checkpoint: dropout masks after a resume are the ones it would have drawn."""
    straight = run(tmp_path / "straight", small_corpus, accum=1, nproc=2, dropout=0.1)
    resumed = resume_from_step_10(tmp_path / "straight", tmp_path / "resumed", small_corpus, nproc=2)
    assert resumed == straight[10:]  # steps 11..20, bit for bit


def test_fsdp_trains_like_one_process_resumes_exactly_and_writes_whole_weights(small_corpus, tmp_path):
    from safetensors.torch import load_file

    from gptcore.weights import load_lm

    fsdp = run(tmp_path / "fsdp", small_corpus, accum=2, nproc=2, parallelism="fsdp")
    assert "parameters sharded over 2 ranks (FSDP)" in (tmp_path / "fsdp" / "log.txt").read_text()
    single = run(tmp_path / "single", small_corpus, accum=4, nproc=1)
    for step, (a, b) in enumerate(zip(fsdp, single, strict=True), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: FSDP {a} vs 1 process {b}"
    # Checkpoints hold the full, unsharded weights, under the names a single process writes.
    sharded = load_file(tmp_path / "fsdp" / "pretrain" / "checkpoints" / "step_000020" / "model.safetensors")
    whole = load_file(tmp_path / "single" / "pretrain" / "checkpoints" / "step_000020" / "model.safetensors")
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in whole.items()}
    model, _ = load_lm(tmp_path / "fsdp" / "pretrain" / "best")  # what export reads
    assert model.lm_head.weight is model.wte.weight
    # Each rank takes its shard of the full optimizer state back: the resumed steps are the same.
    resumed = resume_from_step_10(tmp_path / "fsdp", tmp_path / "resumed", small_corpus, nproc=2)
    assert resumed == fsdp[10:]


def launch_cfg(nproc: int):
    from gptcore.config import FinetuneConfig, ModelConfig, PipelineConfig, TrainConfig

    return PipelineConfig(
        model=ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        pretrain=TrainConfig(
            max_steps=10,
            batch_size=8,
            warmup_steps=2,
            eval_interval=10,
            eval_batches=2,
            log_interval=5,
            checkpoint_interval=10,
            device="cpu",
            nproc_per_node=nproc,
        ),
        finetune=FinetuneConfig(passage_tokens=16),
    )


def test_pipeline_stage_launches_torchrun_and_logs_one_run(small_corpus, tmp_path, mlflow_tracking, monkeypatch):
    import dataclasses

    from gptcore.train.launch import pretrain_stage

    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    shutil.copytree(small_corpus["tokenizer"], tmp_path / "tokenizer")
    parent = mlflow_tracking.client().create_run(mlflow_tracking.experiment_id()).info.run_id
    tracking = dataclasses.replace(mlflow_tracking, parent_run_id=parent)
    result = pretrain_stage(launch_cfg(2), tmp_path, tracking)
    assert result.steps == 10 and (tmp_path / "pretrain" / "best" / "model.safetensors").is_file()
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id()], "tags.`gptcore.stage` = 'pretrain'")
    assert len(runs) == 1  # rank 0 alone logs
    assert runs[0].data.tags["mlflow.parentRunId"] == parent
    assert runs[0].data.params["world_size"] == "2"


def test_a_failing_rank_fails_the_stage_with_its_output(tmp_path, monkeypatch):
    import pytest

    from gptcore.errors import GptcoreError
    from gptcore.train.launch import pretrain_stage

    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    with pytest.raises(GptcoreError, match=r"(?s)exited with code 1.*no tokenized corpus here"):
        pretrain_stage(launch_cfg(2), tmp_path / "empty", None)  # no tokenizer output: every rank fails
