"""Stage-level resume: real Prefect flows (temporary local server) whose stage results carry over between runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect import flow

from flows.pipeline import STAGE_GRAPH
from flows.stage_cache import named, stage_cache
from flows.tasks import NETWORK_RETRIES, _stage
from gptcore.errors import InputError
from gptcore.fsutil import append_jsonl, atomic_dir
from tests.integration.test_pipeline import task_graph


@dataclass
class Shouted:
    out_dir: str
    chars: int


def shout(src: str, out_dir: str) -> Shouted:
    """A stage: upper-cases a file into a directory, and notes each time it really runs."""
    text = Path(src).read_text(encoding="utf-8")
    with atomic_dir(out_dir) as tmp:
        (tmp / "shout.txt").write_text(text.upper(), encoding="utf-8")
    append_jsonl(Path(out_dir).parent / "runs.jsonl", {"src": src})
    return Shouted(str(out_dir), len(text))


shout_task = _stage(shout, "shout", reads=named("src"), writes=named("out_dir"))


@flow(name="shout")
def shout_flow(workdir: str, fresh: bool = False) -> Shouted:
    with stage_cache(workdir, fresh):
        return shout_task(str(Path(workdir) / "in.txt"), str(Path(workdir) / "out"))


def test_a_stage_is_reused_while_inputs_and_outputs_are_unchanged(prefect_server, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.txt").write_text("to be or not", encoding="utf-8")

    def run(fresh: bool = False) -> tuple[Shouted, str]:
        state = shout_flow(str(work), fresh, return_state=True)
        assert state.is_completed()
        return state.result(), dict(task_run_states(state.state_details.flow_run_id))["shout"]

    def runs() -> int:
        return len((work / "runs.jsonl").read_text().splitlines())

    first, status = run()
    assert (status, runs()) == ("Completed", 1)
    again, status = run()
    assert (status, runs()) == ("Cached", 1) and again == first  # read back from JSON as the dataclass
    records = [r for r in (work / ".prefect-results").iterdir() if r.is_file()]
    assert len(records) == 1 and json.loads(records[0].read_text())["metadata"]["serializer"]["type"] == "json"

    (work / "in.txt").write_text("that is the question", encoding="utf-8")  # an input changed
    changed, status = run()
    assert (status, runs(), changed.chars) == ("Completed", 2, 20)
    assert run()[1] == "Cached"

    (work / "out" / "shout.txt").write_text("edited by hand", encoding="utf-8")  # its output changed
    assert run()[1] == "Completed" and (work / "out" / "shout.txt").read_text() == "THAT IS THE QUESTION"
    (work / "out" / "shout.txt").unlink()  # its output is gone
    assert run()[1] == "Completed" and (work / "out" / "shout.txt").is_file()
    assert run()[1] == "Cached"

    assert run(fresh=True)[1] == "Completed"
    assert runs() == 5


def test_network_stages_retry_hiccups_but_not_bad_input(prefect_server):
    from mlflow.exceptions import MlflowException

    attempts: list[str] = []
    errors = {
        # what the MLflow client raises when its server is unreachable: retried
        "unreachable": MlflowException(
            "API request to http://mlflow/api/2.0/mlflow/runs/log-batch failed with "
            "exception HTTPConnectionPool: Max retries exceeded (Connection refused)"
        ),
        "bad input": InputError("eval.json: no 'test' section"),  # retrying cannot help
    }

    def reach_registry(trouble: str) -> str:
        attempts.append(trouble)
        if len(attempts) == 1:
            raise errors[trouble]
        return "registered"

    stage = _stage(reach_registry, "reach-registry", **NETWORK_RETRIES).with_options(retry_delay_seconds=0)

    @flow(name="reach-registry")
    def reach(trouble: str) -> str:
        return stage(trouble)

    assert reach("unreachable") == "registered" and attempts == ["unreachable"] * 2
    attempts.clear()
    with pytest.raises(InputError):
        reach("bad input")
    assert attempts == ["bad input"]


# Shorter training than the tiny preset: this test is about which stages run, not how well they learn.
QUICK = """
pretrain: {max_steps: 60, eval_interval: 30, log_interval: 20, checkpoint_interval: 60}
finetune: {max_steps: 60, eval_interval: 30, log_interval: 20, checkpoint_interval: 60}
sft: {max_steps: 30, eval_interval: 15, log_interval: 15, checkpoint_interval: 30, eval_conversations: 40%s}
"""


def test_a_failed_pipeline_resumes_at_the_stage_that_failed(prefect_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline_flow
    from tests.integration.test_pipeline import prefect_logs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GPTCORE_MLFLOW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    workdir, config = (tmp_path / "work").resolve(), tmp_path / "quick.yaml"

    def run() -> tuple[object, dict[str, list[str]], list[str]]:
        state = pipeline_flow(preset="tiny", config_path=str(config), workdir=str(workdir), return_state=True)
        flow_run_id = state.state_details.flow_run_id
        states: dict[str, list[str]] = {}
        for name, status in task_run_states(flow_run_id):
            states.setdefault(name, []).append(status)
        return state, states, prefect_logs(flow_run_id)

    # A config mistake only chat SFT reads: a chat file that is not there.
    config.write_text(QUICK % ", data: no-such-chats.jsonl", encoding="utf-8")
    failed, states, logs = run()
    assert failed.is_failed()
    assert states == {
        "ingest": ["Completed"],
        "tokenizer": ["Completed"],
        "pretrain": ["Completed"],
        "finetune": ["Completed"],
        "sft": ["Failed"],
    }
    summary = [m for m in logs if m.startswith("pipeline failed at stage sft: InputError: ")]
    assert len(summary) == 1 and "no-such-chats.jsonl: chat data not found" in summary[0]
    assert f"preset=tiny config={config} workdir={workdir}" in summary[0]
    assert f"Prefect flow run {failed.state_details.flow_run_id}" in summary[0] and "MLflow run " in summary[0]

    config.write_text(QUICK % "", encoding="utf-8")  # the mistake fixed; pretraining's config is unchanged
    resumed, states, logs = run()
    assert resumed.is_completed()
    reused = {"ingest", "tokenizer", "pretrain", "finetune"}
    assert {name for name, s in states.items() if s == ["Cached"]} == reused
    assert {name for name, s in states.items() if set(s) == {"Completed"}} == {
        "sft",
        "evaluate-lm",
        "evaluate-classifier",
        "evaluate-sft",
        "export-lm",
        "export-classifier",
        "export-chat",
        "register-lm",
        "register-classifier",
        "register-chat",
        "score",
        "chat-versions",
    }
    assert {m.split(":")[0] for m in logs if ": skipped: inputs, config and code unchanged" in m} == reused
    assert "60 steps" in resumed.result()["text"]  # the summary reads the reused results too

    # Nothing changed: every stage is reused but scoring, registering included (no second version).
    again, states, _ = run()
    assert again.is_completed()
    assert {name for name, s in states.items() if set(s) != {"Cached"}} == {"score", "chat-versions"}
    assert again.result()["headline"] == resumed.result()["headline"]  # results read back from JSON as they were
    assert task_graph(again.state_details.flow_run_id) == {k: set(v) for k, v in STAGE_GRAPH.items()}  # cached too
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    for name in ("gptcore-lm", "gptcore-classifier", "gptcore-chat"):
        assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]


def task_run_states(flow_run_id) -> list[tuple[str, str]]:
    """(stage, the state its task run ended in: Completed, Cached, Failed) for each task run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(run.name.rsplit("-", 1)[0], run.state.name) for run in runs]
