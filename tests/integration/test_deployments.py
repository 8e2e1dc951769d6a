"""The deployments of deploy/prefect.yaml, registered with `prefect deploy` and run by two process
workers, on the process stack (tests/stack.py: PostgreSQL, an S3 server, the MLflow and Prefect
servers with access control on).

The workers hold the credentials of the servers and the bucket, as deployed workers do: the
pipeline (tiny preset, fewer steps) trains and registers champions with artifacts in the bucket,
batch scoring scores a file with the champion classifier, and promotion evaluates a second version
against that champion, after PostgreSQL restarted under both servers.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gptcore.layout import LM_EVAL
from gptcore.processes import free_port, tail
from gptcore.stack import BUCKET, POOL
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

    # the object store unreachable from the registering process: retried (botocore's own retries),
    # then a failure naming the endpoint, and no version made (a version is made once its files are in)
    versions = sorted(v.version for v in registry.search_model_versions("name = 'gptcore-lm'"))
    lm_again = repackaged(work / "export" / "lm", tmp_path / "lm-again")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
            register(lm_again, work / "eval" / LM_EVAL, "gptcore-lm", tracking)
    assert sorted(v.version for v in registry.search_model_versions("name = 'gptcore-lm'")) == versions


def test_a_worker_killed_mid_pipeline_crashes_the_run_and_a_rerun_resumes_from_the_stage_cache(deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    stack = deployed
    config = tmp_path / "fewer-steps.yaml"
    config.write_text(FEWER_STEPS)
    parameters = {"preset": "tiny", "config_path": str(config), "workdir": str(tmp_path / "work")}
    with get_client(sync_client=True) as client:
        first = run_deployment("gptcore-pipeline/pipeline-weekly", timeout=0, parameters=parameters)
        wait_for_task(client, first.id, "tokenizer", stack)  # then training is under way
        # the machine of the worker running it dies: the worker and the flow run's process, at once
        flow_pid = int(str(client.read_flow_run(first.id).infrastructure_pid).rsplit(":", 1)[-1])
        worker = owner_worker(stack, flow_pid)
        for group in {os.getpgid(flow_pid), int((stack.pids / f"{worker}.pid").read_text())}:
            os.killpg(group, signal.SIGKILL)
        killed = time.monotonic()
        while not (crashed := client.read_flow_run(first.id)).state.is_final():
            assert time.monotonic() - killed < 300, f"still {crashed.state.name} 300 s after its worker died"
            time.sleep(1)
        crashed_after = time.monotonic() - killed
        assert crashed.state.is_crashed(), crashed.state
        assert "no heartbeat" in crashed.state.message
        done = {name for name, state in task_states(client, first.id).items() if state == "Completed"}
        assert {"ingest", "tokenizer"} <= done

        stack.start(worker)
        second = run_deployment("gptcore-pipeline/pipeline-weekly", timeout=0, parameters=parameters)
        finished(client, second.id, stack)
        rerun = task_states(client, second.id)
    # what finished before the crash is taken from the stage cache, not run again
    assert {name: rerun[name] for name in done} == dict.fromkeys(done, "Cached"), rerun
    assert rerun["register-lm"] == "Completed"
    print(f"crashed {crashed_after:.0f} s after its worker died; cached on the rerun: {sorted(done)}")


def test_two_pipelines_at_once_run_on_both_workers_and_each_version_meets_the_gate(deployed, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    stack, registry = deployed, MlflowClient()
    before = {v.version for v in registry.search_model_versions("name = 'gptcore-lm'")}
    runs = []
    with get_client(sync_client=True) as client:
        # the weekly deployment runs one at a time (its concurrency limit): the second pipeline is a
        # team's second deployment of the flow, as for another corpus
        weekly = client.read_deployment_by_name("gptcore-pipeline/pipeline-weekly")
        client.create_deployment(
            flow_id=weekly.flow_id,
            name="pipeline-second-corpus",
            entrypoint=weekly.entrypoint,
            work_pool_name=weekly.work_pool_name,
            pull_steps=weekly.pull_steps,
            parameters=weekly.parameters,
            concurrency_limit=1,
        )
        for deployment, steps in (("pipeline-weekly", 30), ("pipeline-second-corpus", 50)):  # two models
            config = tmp_path / f"steps-{steps}.yaml"
            config.write_text(FEWER_STEPS.replace("pretrain: {max_steps: 40", f"pretrain: {{max_steps: {steps}"))
            parameters = {"preset": "tiny", "config_path": str(config), "workdir": str(tmp_path / f"work-{steps}")}
            runs.append(run_deployment(f"gptcore-pipeline/{deployment}", timeout=0, parameters=parameters))
        # the MLflow server restarts as training starts: the stages buffer what they log, then send it
        wait_for_task(client, runs[0].id, "tokenizer", stack)
        stack.restart("mlflow")
        names = [finished(client, flow_run.id, stack).name for flow_run in runs]
    # one flow run at a time per worker (--limit 1): each worker ran one of them
    logs = {worker: (stack.logs / f"{worker}.log").read_text() for worker in stack.worker_names}
    taken = sorted(worker for name in names for worker, log in logs.items() if f"Beginning flow run '{name}'" in log)
    assert taken == sorted(stack.worker_names), taken
    new = sorted(int(v.version) for v in registry.search_model_versions("name = 'gptcore-lm'"))[-2:]
    assert str(new[0]) not in before and str(new[1]) not in before and new[1] == new[0] + 1
    for version in new:  # each judged by the gate against the champion of its time
        assert registry.get_model_version("gptcore-lm", str(version)).tags.get("gptcore.promotion")
    experiment = registry.get_experiment_by_name("gptcore").experiment_id
    pretrain_runs = registry.search_runs(
        [experiment], "tags.`gptcore.stage` = 'pretrain'", order_by=["start_time DESC"]
    )
    logged = sorted(len(registry.get_metric_history(run.info.run_id, "loss/train")) for run in pretrain_runs[:2])
    every = 20  # FEWER_STEPS' log_interval: a point every 20 steps and at the last
    assert logged == [-(-30 // every), -(-50 // every)], logged  # none lost to the restart
    assert all(run.info.status == "FINISHED" for run in pretrain_runs[:2])


def wait_for_task(client, flow_run_id, task: str, stack) -> None:
    """Until the flow run's `task` has completed (a failure if the run ends first)."""
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while task_states(client, flow_run_id).get(task) != "Completed":
        flow_run = client.read_flow_run(flow_run_id)
        assert time.monotonic() < deadline and not flow_run.state.is_final(), f"{flow_run.state}\n{worker_logs(stack)}"
        time.sleep(0.5)


def task_states(client, flow_run_id) -> dict[str, str]:
    """The flow run's tasks by name ("pretrain", "register-lm", ...): their state's name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs if run.state}


def owner_worker(stack, pid: int) -> str:
    """The stack's worker that `pid` descends from."""
    workers = {int((stack.pids / f"{name}.pid").read_text()): name for name in stack.worker_names}
    ancestor = pid
    while ancestor > 1:
        if ancestor in workers:
            return workers[ancestor]
        ancestor = int(re.search(r"^PPid:\s+(\d+)", Path(f"/proc/{ancestor}/status").read_text(), re.M).group(1))
    raise AssertionError(f"process {pid} descends from no worker of the stack")


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
