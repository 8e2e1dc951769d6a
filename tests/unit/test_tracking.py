"""What every MLflow run says about itself, against a real MLflow store (SQLite + local artifacts)."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

import gptcore.sysmetrics as sysmetrics
from gptcore.logs import console_logging
from gptcore.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracking, TrackingSettings, stage_run
from gptcore.train.curves import LOSS_CHART, log_loss_chart, tracked_name
from tests.conftest import SUBPROCESS_ENV


def test_runs_say_who_ran_what_and_the_experiment_is_typed_for_training(mlflow_tracking):
    tagged = dataclasses.replace(mlflow_tracking, run_tags=(("mlflow.source.name", "gptcore-pipeline/run-x"),))
    with stage_run(tagged, "ingest") as run:
        pass
    client = mlflow_tracking.client()
    tags = client.get_run(run.run_id).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "gptcore-pipeline/run-x"  # a flow names itself
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run from the git checkout
    experiment = client.get_experiment(mlflow_tracking.experiment_id())
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_experiment_made_elsewhere_is_typed_on_first_use(mlflow_tracking):
    client = mlflow_tracking.client()
    made = client.create_experiment(mlflow_tracking.settings.experiment)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(made).tags
    assert mlflow_tracking.experiment_id() == made
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.mark.parametrize("interval_s", [0.2, sysmetrics.INTERVAL_S])
def test_a_training_stage_samples_the_machine_into_its_run(mlflow_tracking, monkeypatch, interval_s):
    monkeypatch.setattr(sysmetrics, "INTERVAL_S", interval_s)
    with stage_run(mlflow_tracking, "pretrain", system_metrics=True) as run:
        time.sleep(1.0)  # several samples, or (the default interval) a stage shorter than one
    history = mlflow_tracking.client().get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and all(m.value >= 0 for m in history)
    assert mlflow_tracking.client().get_run(run.run_id).data.metrics["system/system_memory_usage_megabytes"] > 0


def test_losses_share_a_section_and_one_chart(mlflow_tracking, tmp_path):
    assert [tracked_name(k) for k in ("train_loss", "val_loss", "val_response_loss", "val_accuracy", "lr")] == [
        "loss/train",
        "loss/val",
        "loss/val_response",
        "val/accuracy",
        "train/lr",
    ]
    log = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "train_loss": 3.0, "lr": 0.1}, {"step": 2, "train_loss": 2.5}, {"step": 2, "val_loss": 2.7}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    with stage_run(mlflow_tracking, "pretrain") as run:
        log_loss_chart(run, "pretrain", log)
    files = [a.path for a in mlflow_tracking.client().list_artifacts(run.run_id, "charts")]
    assert files == [LOSS_CHART]


def test_libraries_log_warnings_only_unless_asked(monkeypatch, restore_gptcore_logger):
    mlflow_logger = logging.getLogger("mlflow")
    monkeypatch.setattr(mlflow_logger, "level", mlflow_logger.level)  # restored after the test
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.delenv("GPTCORE_LIBRARY_LOG_LEVEL", raising=False)
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    console_logging()
    assert mlflow_logger.level == logging.WARNING and logging.getLogger("gptcore").level == logging.INFO
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # for an MLflow imported later: it sets its own level
    monkeypatch.setenv("GPTCORE_LIBRARY_LOG_LEVEL", "info")
    console_logging()
    assert mlflow_logger.level == logging.INFO


def test_a_process_killed_while_mlflow_creates_its_sqlite_tables_leaves_no_broken_store(tmp_path):
    """Killed between MLflow's first tables and its migrations (as a pipeline killed in its first
    stage can be): the store is not there, and the next run makes it whole."""
    db = tmp_path / "work" / "mlflow.db"
    killed_mid_creation = (
        "import os, signal\n"
        "import mlflow.store.db.utils as db_utils\n"
        "db_utils._upgrade_db = lambda engine: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from gptcore.tracking import Tracking, TrackingSettings\n"
        f"Tracking(TrackingSettings('sqlite:///{db}', None, None, 'gptcore')).client().search_experiments()\n"
    )
    child = subprocess.run([sys.executable, "-c", killed_mid_creation], env=SUBPROCESS_ENV, capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not db.exists()
    tracking = Tracking(TrackingSettings(f"sqlite:///{db}", None, str(tmp_path / "artifacts"), "gptcore"))
    assert tracking.client().get_experiment(tracking.experiment_id()).name == "gptcore"
