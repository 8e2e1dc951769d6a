"""The deployments of deploy/prefect.yaml, registered with `prefect deploy` and run by a process
worker, against real Prefect and MLflow servers with access control on (tests/servers.py).

The worker holds the credentials of both servers, as a deployed worker does: the pipeline (tiny
preset, fewer steps) trains and registers champions on the MLflow server, batch scoring scores a file with the
champion classifier, and promotion evaluates a second version against that champion.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, repackaged
from tests.servers import BIN, background, clean_env, run, tail

POOL = "gptcore-process"  # the yaml's: `prefect deploy --all` ignores --pool (it applies to one deployment)
FLOW_RUN_TIMEOUT_S = 900
# The tiny preset with fewer training steps: what is under test is the deployment, not the models
FEWER_STEPS = """
pretrain: {max_steps: 40, eval_interval: 20, log_interval: 20, checkpoint_interval: 40}
finetune: {max_steps: 40, eval_interval: 20, log_interval: 20, checkpoint_interval: 40}
sft: {max_steps: 20, eval_interval: 10, log_interval: 10, checkpoint_interval: 20, eval_conversations: 50}
"""


@pytest.fixture(scope="module")
def deployed(servers, tmp_path_factory):
    """The process work pool, the deployments of deploy/prefect.yaml in it, and a worker polling it
    (its log file is yielded). The worker starts first: it boots while `prefect deploy` runs."""
    root = tmp_path_factory.mktemp("worker")
    prefect = str(BIN / "prefect")
    env = clean_env(PREFECT_HOME=root / "prefect-home", **servers.prefect.client_env())
    run([prefect, "work-pool", "create", POOL, "--type", "process"], env)
    worker_env = env | servers.mlflow.client_env() | {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = root / "worker.log"
    with background([prefect, "worker", "start", "--pool", POOL, "--type", "process"], worker_env, log, cwd=root):
        run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"], env, cwd=REPO)
        yield log


def test_prefect_yaml_registers_the_three_deployments(servers, deployed):
    from prefect.client.orchestration import get_client

    with servers.prefect.settings(servers.prefect.auth_string), get_client(sync_client=True) as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
    assert set(found) == {
        "gptcore-pipeline/pipeline-weekly",
        "gptcore-scoring/scoring-hourly",
        "gptcore-promote/promote-version",
    }
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in found.items()}
    assert crons == {
        "gptcore-pipeline/pipeline-weekly": ["0 3 * * 1"],
        "gptcore-scoring/scoring-hourly": ["0 * * * *"],
        "gptcore-promote/promote-version": [],
    }
    for d in found.values():
        assert d.work_pool_name == POOL
        # flow runs start in the checkout `prefect deploy` ran in, where the entrypoints are
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert d.parameters["mlflow_config"] == "deploy/mlflow.yaml"
    assert found["gptcore-scoring/scoring-hourly"].parameters["model_uri"] == "models:/gptcore-classifier@champion"


def test_pipeline_scoring_and_promotion_run_on_the_worker_with_credentials(servers, deployed, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from gptcore.layout import CHAMPION
    from gptcore.registry.register import register
    from gptcore.tracking import Tracking, load_settings

    work, config = tmp_path / "work", tmp_path / "fewer-steps.yaml"
    config.write_text(FEWER_STEPS)
    with servers.prefect.settings(servers.prefect.auth_string), get_client(sync_client=True) as client:
        pipeline = run_deployment(
            "gptcore-pipeline/pipeline-weekly",
            timeout=0,
            parameters={"preset": "tiny", "config_path": str(config), "workdir": str(work)},
        )
        finished(client, pipeline.id, deployed)

        for name, value in servers.mlflow.client_env().items():
            monkeypatch.setenv(name, value)
        registry = MlflowClient(tracking_uri=servers.mlflow.uri)
        for name in ("gptcore-lm", "gptcore-classifier"):
            assert str(registry.get_model_version_by_alias(name, CHAMPION).version) == "1"
        experiment = registry.get_experiment_by_name("gptcore")
        (parent,) = registry.search_runs([experiment.experiment_id], "tags.`gptcore.stage` = 'pipeline'")
        assert parent.info.status == "FINISHED"
        # deploy/mlflow.yaml leaves artifacts to the server: they went through it, not to a local path
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")

        # a second classifier version, the same model: the gate must keep the champion
        tracking = Tracking(load_settings(work, REPO / "deploy" / "mlflow.yaml"))
        again = repackaged(work / "export" / "classifier", tmp_path / "classifier-again")
        second = register(again, work / "eval" / "classifier_eval.json", "gptcore-classifier", tracking)
        assert second.version == "2" and not second.promoted
        test_split, scored = work / "data" / "test.parquet", tmp_path / "scored.parquet"
        scoring = run_deployment(
            "gptcore-scoring/scoring-hourly",
            timeout=0,
            parameters={"input_path": str(test_split), "output_path": str(scored), "workdir": str(work)},
        )
        promotion = run_deployment(
            "gptcore-promote/promote-version",
            timeout=0,
            parameters={"version": 2, "data_path": str(test_split), "preset": "tiny", "workdir": str(work)},
        )
        # a drift warning is a Completed-type state too
        finished(client, scoring.id, deployed)
        finished(client, promotion.id, deployed)

    assert pq.read_metadata(scored).num_rows == pq.read_metadata(test_split).num_rows
    assert {"label", "confidence"} <= set(pq.read_schema(scored).names)
    assert str(registry.get_model_version_by_alias("gptcore-classifier", CHAMPION).version) == "1"
    decision = registry.get_model_version("gptcore-classifier", "2").tags["gptcore.promotion"]
    assert (
        decision.startswith(f"on {test_split}, against champion v1: ") and "not a significant improvement" in decision
    )
    assert "gptcore.challenge.v2" in registry.get_model_version("gptcore-classifier", "1").tags


def finished(client, flow_run_id, worker_log: Path):
    """The flow run once it ends (waiting FLOW_RUN_TIMEOUT_S at most); a failure, with the worker's log,
    unless it completed."""
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
        if time.monotonic() > deadline:
            pytest.fail(
                f"flow run {flow_run.name} is still {flow_run.state.name} after {FLOW_RUN_TIMEOUT_S} s; "
                f"worker log:\n{tail(worker_log)}"
            )
        time.sleep(1)
    if not flow_run.state.is_completed():
        pytest.fail(
            f"flow run {flow_run.name}: {flow_run.state.name}: {flow_run.state.message}\n"
            f"worker log:\n{tail(worker_log, 80)}"
        )
    return flow_run
