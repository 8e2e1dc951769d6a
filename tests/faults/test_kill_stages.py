"""SIGKILL at a random point of every stage, then the pipeline run again: it completes, and its figures
equal an uninterrupted run's.

One chain per seed: the tiny pipeline runs as a real `gptcore pipeline` process (on the session's
Prefect server, MLflow in the work directory) and is killed, with its whole process group, at a
random point inside stage 1; run again, it reuses what completed and is killed inside stage 2; and so
on through the last stage, then it runs to the end. Where in a stage is drawn from the stage's
duration in the uninterrupted reference run. After every kill, every finished output the work
directory holds must read back whole. `GPTCORE_FAULT_SEEDS=3` runs three chains (CI runs one).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

SEEDS = range(int(os.environ.get("GPTCORE_FAULT_SEEDS", "1")))
FLOW_STARTED = re.compile(r"Beginning flow run")
TASK_ENDED = re.compile(r"Task run '([\w-]+?)-[0-9a-f]+' - Finished in state (\w+)")
RUN_LIMIT_S = 600


class PipelineProcess:
    """`gptcore pipeline --preset tiny` in its own process group, its output read line by line."""

    def __init__(self, workdir: Path, cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptcore.cli", "pipeline", "--preset", "tiny", "--workdir", str(workdir)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def events(self, deadline: float):
        """(time, 'start' | task name) as the flow starts and each task ends, until the process exits."""
        while (line := self.lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            self.log.append(line)
            if FLOW_STARTED.search(line):
                yield time.monotonic(), "start"
            elif m := TASK_ENDED.search(line):
                yield time.monotonic(), m.group(1)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self) -> str:
        return "".join(self.log[-40:])


def run_env(prefect_api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GPTCORE_MLFLOW"))}
    env.update(PREFECT_API_URL=prefect_api_url, PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).parents[2]))
    return env


def run_to_end(workdir: Path, cwd: Path, env: dict[str, str]) -> list[tuple[float, str]]:
    run = PipelineProcess(workdir, cwd, env)
    events = list(run.events(time.monotonic() + RUN_LIMIT_S))
    assert run.proc.wait() == 0, run.tail()
    return events


def kill_inside(workdir: Path, cwd: Path, env: dict[str, str], stage: int, delay: float) -> int:
    """Run until `stage` tasks have ended (0: the flow has started), wait `delay` s and SIGKILL the run.
    Returns how many tasks had ended by the kill: the stage it landed in."""
    run = PipelineProcess(workdir, cwd, env)
    ended, deadline = -1, time.monotonic() + RUN_LIMIT_S
    for _, _ in run.events(deadline):
        ended += 1
        if ended == stage:
            break
    else:
        pytest.fail(f"the run exited before task {stage}:\n{run.tail()}")
    time.sleep(delay)
    run.kill()
    return ended + sum(1 for _ in run.events(time.monotonic() + 10))  # lines written before the kill


def figures(workdir: Path) -> dict:
    """What a run produced, without times and paths: the latest pipeline summary's headline and
    versions, and the scores."""
    summaries = sorted(workdir.glob("mlartifacts/*/artifacts/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text())
    models = {
        name: {k: v for k, v in m.items() if k in ("version", "promoted")} for name, m in summary["models"].items()
    }
    scores = pq.read_table(workdir / "scores" / "test_scores.parquet").drop_columns(["text"]).to_pydict()
    return {"headline": summary["headline"], "models": models, "scores": scores}


def outputs_read_whole(workdir: Path) -> list[str]:
    """Every finished output file (not a temporary sibling) that the work directory holds reads back."""
    bad = []
    for path in workdir.rglob("*"):
        if not path.is_file() or ".tmp-" in str(path) or "mlartifacts" in path.parts:
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".jsonl":
                lines = path.read_text(encoding="utf-8").splitlines()
                for line in lines[:-1]:  # an append-only log may end in the line a kill cut short
                    json.loads(line)
            elif path.suffix == ".parquet":
                pq.read_table(path)
        except (ValueError, OSError) as e:
            bad.append(f"{path.relative_to(workdir)}: {e}")
    return bad


@pytest.fixture(scope="module")
def reference(prefect_server, tmp_path_factory):
    """The uninterrupted run: its figures, and how long each stage took."""
    from prefect.settings import get_current_settings

    env = run_env(get_current_settings().api.url)
    root = tmp_path_factory.mktemp("reference")
    events = run_to_end(root / "work", root, env)
    times = [t for t, _ in events]
    durations = [b - a for a, b in itertools.pairwise(times)]
    return {"env": env, "figures": figures(root / "work"), "durations": durations, "tasks": [n for _, n in events[1:]]}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_pipeline_killed_in_every_stage_completes_with_the_uninterrupted_figures(reference, tmp_path, seed):
    rng = random.Random(seed)
    workdir, landed = tmp_path / "work", []
    for stage, duration in enumerate(reference["durations"]):
        landed.append(kill_inside(workdir, tmp_path, reference["env"], stage, rng.uniform(0, duration)))
        assert not (bad := outputs_read_whole(workdir)), f"after a kill in task {stage + 1}: {bad}"
    run_to_end(workdir, tmp_path, reference["env"])
    print(f"seed {seed}: kills landed in tasks", [reference["tasks"][i] for i in landed if i < len(reference["tasks"])])
    assert figures(workdir) == reference["figures"]
