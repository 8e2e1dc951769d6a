"""Two runs at once: on one work directory, onto one output, on one champion alias.

The holders are real processes: one that takes the work directory's lock as the pipeline flow
does and sleeps, and a real scoring run paused after its first chunk. The second comers are the
real `gptcore` commands, the real pipeline flow (on the session's Prefect server) and `score`;
each must be refused at once, naming the holder, and leave the holder's files as they were. A
holder SIGKILLed leaves its lock file behind, and the next run takes it over. The alias moves
come from a second MLflow client in the middle of a promotion; only the minutes-long evaluation
is faked, never the registry.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gptcore.errors import GptcoreError
from gptcore.layout import CHAMPION
from gptcore.locks import LockedError
from tests.conftest import REPO, SUBPROCESS_ENV, input_file, repackaged, write_labelled_corpus

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 60
# Takes the work directory's lock as flows/pipeline.py does, says so, and holds it until killed.
HOLDER = """
import sys, time
from gptcore.locks import workdir_lock
with workdir_lock(sys.argv[1], "gptcore pipeline"):
    print("held", flush=True)
    time.sleep(600)
"""
# A real scoring run, paused once its first chunk is on disk until the file argv[4] appears.
PAUSED_SCORING = """
import functools, pathlib, sys, time
import gptcore.registry.score as stage

def pause(index):
    if index == 0:
        print("scoring", flush=True)
        while not pathlib.Path(sys.argv[4]).exists():
            time.sleep(0.05)

stage.score_file = functools.partial(stage.score_file, on_chunk=pause)
cfg = stage.ScoreConfig(chunk_rows=8, batch_size=8)
print(stage.score(sys.argv[1], sys.argv[2], sys.argv[3], cfg=cfg, device="cpu").rows, flush=True)
"""


def start(script: str, *args) -> subprocess.Popen:
    """`script` in a new process, once it printed its first line (that it holds what it takes)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"the holder exited before taking its lock: {proc.communicate(timeout=10)[1][-2000:]}")
    return proc


def gptcore(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptcore.cli", *map(str, args)],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # no finally, no atexit: the kernel drops the flock
    proc.wait(timeout=30)


@pytest.fixture
def held_workdir(tmp_path):
    """A work directory holding a stage's output, its lock held by a live holder process."""
    workdir = tmp_path / "work"
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "manifest.json").write_text('{"the first run": "wrote this"}\n')
    holder = start(HOLDER, workdir)
    yield workdir, holder
    if holder.poll() is None:
        kill(holder)


def refused_by_holder(message: str, workdir: Path, holder: subprocess.Popen) -> bool:
    return (
        f"work dir {workdir} is in use by `gptcore pipeline` pid {holder.pid} on host {socket.gethostname()} since"
        in message
        and f"lock file {workdir / '.gptcore.lock'}" in message
    )


def test_a_stage_beside_a_pipeline_is_refused_and_after_a_kill_the_lock_is_taken_over(held_workdir, tmp_path):
    workdir, holder = held_workdir
    before = snapshot(workdir)
    config = tmp_path / "small.yaml"
    config.write_text(f"ingest: {{sources: [{write_labelled_corpus(tmp_path / 'corpus.jsonl')}]}}\n")

    started = time.perf_counter()
    second = gptcore("ingest", "--preset", "tiny", "--config", config, "--workdir", workdir, "--no-tracking")
    refused_in = time.perf_counter() - started
    assert second.returncode == 2, second.stderr
    assert refused_by_holder(second.stderr, workdir, holder), second.stderr
    assert snapshot(workdir) == before  # the holder's output and its lock record, byte for byte
    assert holder.poll() is None  # and the holder runs on

    kill(holder)
    rerun = gptcore("ingest", "--preset", "tiny", "--config", config, "--workdir", workdir, "--no-tracking")
    assert rerun.returncode == 0, rerun.stderr
    assert f"taken over from `gptcore pipeline` pid {holder.pid}" in rerun.stderr
    assert "splits" in json.loads((workdir / "data" / "manifest.json").read_text())  # the stage ran: its manifest
    assert pq.read_metadata(workdir / "data" / "train.parquet").num_rows > 0
    assert not (workdir / ".gptcore.lock").exists()  # released at the end
    print(f"refused in {refused_in:.2f} s (a whole `gptcore ingest` process)")


def test_a_second_pipeline_is_refused_before_any_stage(held_workdir, prefect_server):
    from flows.pipeline import pipeline_flow

    workdir, holder = held_workdir
    before = snapshot(workdir)
    started = time.perf_counter()
    cli = gptcore("pipeline", "--preset", "tiny", "--workdir", workdir)  # refused before Prefect starts
    cli_s = time.perf_counter() - started
    assert cli.returncode == 2 and refused_by_holder(cli.stderr, workdir, holder), cli.stderr

    # the flow itself, as a deployment or a script starts it
    state = pipeline_flow(preset="tiny", workdir=str(workdir), return_state=True)
    assert state.is_failed()
    with pytest.raises(LockedError) as refused:
        state.result()
    assert refused_by_holder(str(refused.value), workdir, holder)
    assert snapshot(workdir) == before and not (workdir / ".prefect-results").exists()
    assert holder.poll() is None
    print(f"`gptcore pipeline` refused in {cli_s:.2f} s")


def test_two_scorings_onto_one_output_are_never_mixed(classifier_package, tmp_path):
    from gptcore.registry.score import score

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first_input, other_input = input_file(tmp_path / "a", ".parquet", n=40), input_file(tmp_path / "b", ".jsonl")
    out, go = tmp_path / "scores.parquet", tmp_path / "go"
    package = classifier_package.package_dir
    first = start(PAUSED_SCORING, package, first_input, out, go)
    try:
        parts = sorted(p.name for p in (tmp_path / "scores.parquet.parts").iterdir())
        with pytest.raises(LockedError) as refused:
            score(str(package), other_input, out, device="cpu")
        message = str(refused.value)
        holder = f"`scoring of {first_input} with {package}` pid {first.pid}"
        assert message.startswith(f"output {out} is in use by {holder}")
        assert f"lock file {out}.lock" in message
        # the first run's parts are as it left them: nothing of the second input was written
        assert sorted(p.name for p in (tmp_path / "scores.parquet.parts").iterdir()) == parts
        go.touch()
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            kill(first)
    assert first.returncode == 0, stderr
    assert pq.read_table(out).column("id").to_pylist() == list(range(40))  # every row, and only, the first input's
    assert pq.read_table(out).column("text").to_pylist() == pq.read_table(first_input).column("text").to_pylist()

    second = score(str(package), other_input, out, device="cpu")  # once the first is done, the second runs
    assert second.rows == 45 and not Path(f"{out}.lock").exists()


def test_a_scoring_killed_mid_run_leaves_its_lock_to_the_next(classifier_package, tmp_path):
    from gptcore.registry.score import score

    src, out = input_file(tmp_path, ".parquet"), tmp_path / "scores.parquet"
    first = start(PAUSED_SCORING, classifier_package.package_dir, src, out, tmp_path / "never")
    kill(first)
    assert Path(f"{out}.lock").exists()  # what a killed run leaves
    resumed = score(str(classifier_package.package_dir), src, out, device="cpu", cfg=_chunks_of(8))
    assert (resumed.rows, resumed.chunks_skipped) == (45, 1)  # its kept chunk reused, under the new holder


def _chunks_of(rows: int):
    from gptcore.config import ScoreConfig

    return ScoreConfig(chunk_rows=rows, batch_size=8)


# --- the champion alias ----------------------------------------------------------------------------


def bare_versions(tracking, name: str, count: int, source: Path) -> None:
    """`count` registered versions of `name` (v1 champion): promotion reads only their aliases and tags."""
    client = tracking.client()
    client.create_registered_model(name)
    source.mkdir(exist_ok=True)
    for _ in range(count):
        client.create_model_version(name, source=str(source))
    client.set_registered_model_alias(name, CHAMPION, "1")


def test_promotion_refuses_when_the_champion_moved_during_its_evaluation(mlflow_tracking, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import gptcore.registry.promotion as promotion

    bare_versions(mlflow_tracking, "clf", 3, tmp_path / "src")
    other = MlflowClient(mlflow_tracking.settings.tracking_uri)  # another operator, another process's client
    evaluated = []

    def evaluation_meanwhile_v3_is_promoted(uris, *args, **kwargs):  # stands in for minutes of ONNX Runtime
        evaluated.append(uris)
        other.set_registered_model_alias("clf", CHAMPION, "3")
        return {"comparisons": [{"promote": True, "reason": "macro-F1 +0.2", "figures": {"gain": 0.2}}]}

    monkeypatch.setattr(promotion, "evaluate_versions", evaluation_meanwhile_v3_is_promoted)
    with pytest.raises(promotion.AliasMovedError) as refused:
        promotion.promote_version("clf", 2, tmp_path / "labelled.jsonl", mlflow_tracking)
    assert evaluated == [["models:/clf/1", "models:/clf/2"]]
    assert isinstance(refused.value, GptcoreError)
    assert str(refused.value).startswith("models:/clf@champion now points at v3, not v1 as when v2 was judged")
    client = mlflow_tracking.client()
    assert str(client.get_model_version_by_alias("clf", CHAMPION).version) == "3"  # the other move stands
    for version in ("1", "2", "3"):  # and no decision against a stale champion went on record
        assert not any(tag.startswith("gptcore.") for tag in client.get_model_version("clf", version).tags)


def test_registration_decides_again_when_the_champion_moved_while_it_decided(
    classifier_package, classifier_evaluation, mlflow_tracking, monkeypatch, caplog, tmp_path
):
    import gptcore.registry.register as registration

    package, evaluation = classifier_package.package_dir, classifier_evaluation.metrics_path
    first = registration.register(package, evaluation, "clf", mlflow_tracking)
    client = mlflow_tracking.client()
    v1 = client.get_model_version("clf", first.version)
    # v2: the same package registered by someone else, without its evidence (decided on the stored metric)
    moved_to = str(client.create_model_version("clf", source=v1.source, run_id=v1.run_id).version)
    real_decide, judged = registration.decide, []

    def decide_while_the_alias_moves(tracking, champion, *args):
        judged.append(str(champion.version))
        if len(judged) == 1:
            client.set_registered_model_alias("clf", CHAMPION, moved_to)
        return real_decide(tracking, champion, *args)

    monkeypatch.setattr(registration, "decide", decide_while_the_alias_moves)
    with caplog.at_level(logging.WARNING, logger="gptcore"):
        result = registration.register(repackaged(package, tmp_path / "again"), evaluation, "clf", mlflow_tracking)
    assert judged == ["1", moved_to]  # judged against v1, then again against the champion of then
    assert result.previous_champion_version == moved_to
    assert f"models:/clf@champion now points at v{moved_to}, not v1" in caplog.text
    assert result.promoted and f"champion v{moved_to}'s" in result.reason  # v2 kept no metric: any value beats it
    challenge = client.get_model_version("clf", moved_to).tags[f"gptcore.challenge.v{result.version}"]
    assert challenge.endswith(result.reason)
    assert f"gptcore.challenge.v{result.version}" not in client.get_model_version("clf", "1").tags


def test_scoring_resolves_the_alias_once_and_records_the_version(
    trained, classifier_package, classifier_evaluation, mlflow_tracking, tmp_path, monkeypatch
):
    import gptcore.registry.score as stage
    from gptcore.registry.register import register

    register(classifier_package.package_dir, classifier_evaluation.metrics_path, "clf", mlflow_tracking)
    client = mlflow_tracking.client()
    v1 = client.get_model_version("clf", "1")
    client.create_model_version("clf", source=v1.source, run_id=v1.run_id, tags=v1.tags)  # v2, identical
    real_score_file = stage.score_file

    def score_file_while_v2_is_promoted(*args, **kwargs):
        client.set_registered_model_alias("clf", CHAMPION, "2")
        return real_score_file(*args, **kwargs)

    monkeypatch.setattr(stage, "score_file", score_file_while_v2_is_promoted)
    result = stage.score(
        "models:/clf@champion", trained["data"] / "test.parquet", tmp_path / "out.parquet", tracking=mlflow_tracking
    )
    assert str(client.get_model_version_by_alias("clf", CHAMPION).version) == "2"  # it moved mid-run
    assert (result.model_uri, result.model_version) == ("models:/clf@champion", "1")
    assert result.drift["reference"] == "clf v1's test documents"  # the drift reference of the version scored
    (run,) = client.search_runs([mlflow_tracking.experiment_id()], "tags.`gptcore.stage` = 'score'")
    assert run.data.tags["gptcore.model_uri"] == "models:/clf@champion"
    tags = run.data.tags
    assert (tags["gptcore.model_version"], tags["gptcore.model_version_uri"]) == ("1", "models:/clf/1")
    assert run.data.params["model"] == "models:/clf/1"
    assert os.path.exists(result.output_path)
