"""The deployments of deploy/prefect.yaml, registered with `prefect deploy` and run by two process
workers, on the process stack (tests/stack.py: PostgreSQL, an S3 server, the MLflow and Prefect
servers with access control on).

The workers hold the credentials of the servers and the bucket, as deployed workers do: the
pipeline (tiny preset, fewer steps) trains and registers champions with artifacts in the bucket,
batch scoring scores a file with the champion classifier, and promotion evaluates a second version
against that champion, after PostgreSQL restarted under both servers.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from gptcore.stack import BUCKET, POOL, tail
from tests.conftest import REPO, repackaged
from tests.servers import BIN, run
from tests.stack import client_env

FLOW_RUN_TIMEOUT_S = 900
# The tiny preset with fewer training steps: what is under test is the deployment, not the models
FEWER_STEPS = """
pretrain: {max_steps: 40, eval_interval: 20, log_interval: 20, checkpoint_interval: 40}
finetune: {max_steps: 40, eval_interval: 20, log_interval: 20, checkpoint_interval: 40}
sft: {max_steps: 20, eval_interval: 10, log_interval: 10, checkpoint_interval: 20, eval_conversations: 50}
"""


@pytest.fixture(scope="module")
def deployed(stack, tmp_path_factory):
    """The deployments of deploy/prefect.yaml on the stack's pool (its workers poll it already);
    yields the stack, with this process its client."""
    home = tmp_path_factory.mktemp("deployer")
    with client_env(stack) as env:
        deploy = [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"]
        run(deploy, env | {"PREFECT_HOME": str(home)}, cwd=REPO)
        yield stack


def worker_logs(stack) -> str:
    return "\n".join(f"--- {log.name}\n{tail(log, 60)}" for log in sorted(stack.logs.glob("worker-*.log")))


def test_prefect_yaml_registers_the_three_deployments(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
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


def test_pipeline_scoring_and_promotion_on_the_stack(deployed, tmp_path):
    import psycopg
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from gptcore.layout import CHAMPION
    from gptcore.registry.register import register
    from gptcore.tracking import Tracking, load_settings

    stack = deployed
    work, config = tmp_path / "work", tmp_path / "fewer-steps.yaml"
    config.write_text(FEWER_STEPS)
    with get_client(sync_client=True) as client:
        pipeline = run_deployment(
            "gptcore-pipeline/pipeline-weekly",
            timeout=0,
            parameters={"preset": "tiny", "config_path": str(config), "workdir": str(work)},
        )
        finished(client, pipeline.id, stack)

        registry = MlflowClient()
        for name in ("gptcore-lm", "gptcore-classifier"):
            assert str(registry.get_model_version_by_alias(name, CHAMPION).version) == "1"
        experiment = registry.get_experiment_by_name("gptcore")
        (parent,) = registry.search_runs([experiment.experiment_id], "tags.`gptcore.stage` = 'pipeline'")
        assert parent.info.status == "FINISHED"
        # artifacts went to the bucket, and the version's files are there for a plain S3 client
        assert parent.info.artifact_uri.startswith(f"s3://{BUCKET}/")
        version = registry.get_model_version("gptcore-classifier", "1")
        package = version.source  # the logged model's files
        assert package.startswith(f"s3://{BUCKET}/")
        prefix = package.removeprefix(f"s3://{BUCKET}/")
        keys = [o["Key"] for o in stack.s3_client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
        assert any(key.endswith(".onnx") for key in keys), keys

        # the registry and the flow runs are rows in PostgreSQL, queried without gptcore or the servers
        with psycopg.connect(stack.config.db_uri("mlflow")) as db:
            rows = db.execute("select name, version from model_versions order by name, version").fetchall()
        assert ("gptcore-classifier", 1) in rows and ("gptcore-lm", 1) in rows
        with psycopg.connect(stack.config.db_uri("prefect")) as db:
            (state,) = db.execute("select state_type from flow_run where id = %s", (pipeline.id,)).fetchone()
        assert state == "COMPLETED"

        # PostgreSQL restarts under both servers: they reconnect, and the deployments go on
        stack.restart("postgres")
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
        finished(client, scoring.id, stack)
        finished(client, promotion.id, stack)

    assert pq.read_metadata(scored).num_rows == pq.read_metadata(test_split).num_rows
    assert {"label", "confidence"} <= set(pq.read_schema(scored).names)
    assert str(registry.get_model_version_by_alias("gptcore-classifier", CHAMPION).version) == "1"
    decision = registry.get_model_version("gptcore-classifier", "2").tags["gptcore.promotion"]
    assert (
        decision.startswith(f"on {test_split}, against champion v1: ") and "not a significant improvement" in decision
    )
    assert "gptcore.challenge.v2" in registry.get_model_version("gptcore-classifier", "1").tags


def finished(client, flow_run_id, stack):
    """The flow run once it ends (waiting FLOW_RUN_TIMEOUT_S at most); a failure, with the workers'
    logs, unless it completed."""
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
        if time.monotonic() > deadline:
            pytest.fail(
                f"flow run {flow_run.name} is still {flow_run.state.name} after {FLOW_RUN_TIMEOUT_S} s; "
                f"workers' logs:\n{worker_logs(stack)}"
            )
        time.sleep(1)
    if not flow_run.state.is_completed():
        pytest.fail(f"flow run {flow_run.name}: {flow_run.state.name}: {flow_run.state.message}\n{worker_logs(stack)}")
    return flow_run
