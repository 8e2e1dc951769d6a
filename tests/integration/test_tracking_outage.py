"""A tracking server outage during training: a real loopback `mlflow server`, stopped and started again mid-run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from gptcore.config import ModelConfig, TrainConfig
from gptcore.model import GPT
from gptcore.tracking import StageRun, Tracking, TrackingSettings, TrackingUnavailable, stage_run
from gptcore.train.batches import TokenBatches
from gptcore.train.checkpoint import latest_checkpoint
from gptcore.train.curves import tracked_name
from gptcore.train.distributed import setup
from gptcore.train.loop import fit, lm_loss
from tests.servers import background, clean_env, free_port, mlflow_server_command, wait_ready

TRAIN = TrainConfig(
    max_steps=12, batch_size=4, warmup_steps=2, eval_interval=4, log_interval=1, checkpoint_interval=12, device="cpu"
)
METRICS_PER_STEP = 4  # train_loss, lr, tokens_per_s, peak_mem_bytes
MODEL = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_size=64)


@contextlib.contextmanager
def mlflow_server(root: Path, port: int) -> Iterator[None]:
    """`mlflow server` on `port`: runs in SQLite, artifacts in a directory, both under `root` (kept across restarts)."""
    log = root / f"server-{len(list(root.glob('server-*.log')))}.log"
    cmd = mlflow_server_command(root, port)
    with background(cmd, clean_env(), log) as proc:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", log)
        yield


def train(out_dir: Path, tracking: Tracking, on_eval) -> tuple[int, str]:
    """A tiny GPT trained through the shared loop, logging every step; `on_eval(run, n)` at the n-th evaluation."""
    tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, 5000).astype(np.uint16)
    evaluations = []

    def evaluate(model) -> dict[str, float]:
        evaluations.append(None)
        on_eval(run, len(evaluations))
        return {"val_loss": 4.0 - len(evaluations) / 10}

    with stage_run(tracking, "pretrain") as run:
        fitted = fit(
            "pretrain",
            GPT(MODEL),
            TRAIN,
            TokenBatches(tokens, TRAIN.batch_size, MODEL.block_size, 0),
            lm_loss,
            evaluate,
            out_dir,
            {"kind": "lm", "model": asdict(MODEL)},
            run,
            ("val_loss", "min"),
            setup("cpu"),
        )
    return fitted.steps, run.run_id


@pytest.fixture
def outage_settings(monkeypatch):
    # While the server is down a request fails at once (no MLflow client retries), and each later
    # metric call tries again (no wait between attempts): the outage fits in a few training steps.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setattr(StageRun, "RETRY_AFTER_S", 0.0)


def test_no_metric_is_lost_to_an_mlflow_outage_during_training(outage_settings, tmp_path):
    from mlflow import MlflowClient

    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    tracking = Tracking(
        TrackingSettings(tracking_uri=uri, registry_uri=None, artifact_location=None, experiment="outage")
    )
    servers = contextlib.ExitStack()
    servers.enter_context(mlflow_server(root, port))
    kept_during_outage = []

    def outage(run: StageRun, n: int) -> None:
        if n == 1:  # step 4, after its training metrics: the server goes away
            servers.close()
        elif n == 2:  # step 8: the server comes back
            kept_during_outage.append(len(run.pending))
            servers.enter_context(mlflow_server(root, port))
        elif n == 3:  # step 12: the first call after the outage sent everything kept
            assert run.pending == []

    try:
        steps, run_id = train(tmp_path / "out", tracking, outage)
        assert steps == TRAIN.max_steps  # training went on through the outage
        assert kept_during_outage == [1 + 4 * METRICS_PER_STEP]  # the step-4 evaluation, steps 5-8
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        for name in ("train_loss", "val_loss"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, tracked_name(name)))
            assert history == [(r["step"], pytest.approx(r[name])) for r in logged if name in r]
        assert [step for step, _ in history] == [4, 8, 12]
        assert len(client.get_metric_history(run_id, "loss/train")) == TRAIN.max_steps

        # Down at the end of a stage: the stage fails, but only once its checkpoint is on disk.
        def down_at_the_end(run: StageRun, n: int) -> None:
            if n == 3:
                servers.close()

        with pytest.raises(TrackingUnavailable, match="still unreachable at the end of the stage: 1 metric values"):
            train(tmp_path / "out2", tracking, down_at_the_end)
        assert latest_checkpoint(tmp_path / "out2" / "checkpoints").name == f"step_{TRAIN.max_steps:06d}"
        assert (tmp_path / "out2" / "best" / "model.safetensors").is_file()
    finally:
        servers.close()
