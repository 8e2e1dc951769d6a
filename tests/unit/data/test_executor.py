"""`gptcore.data.executor`: results in task order wherever the tasks run, a bounded look-ahead,
and the cluster settings checked."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from gptcore.config import IngestConfig, TokenizerConfig
from gptcore.data import executor
from gptcore.data import ingest as ingest_module
from gptcore.data.executor import describe, in_process, ordered_results
from gptcore.data.ingest import ingest
from gptcore.errors import ConfigError


def slow_square(x: int) -> int:
    time.sleep(0.05 * (x % 3))  # later tasks finish first, now and then
    return x * x


def test_results_come_in_task_order_in_process_and_on_worker_processes():
    tasks = list(range(12))
    assert list(ordered_results(slow_square, tasks, workers=1)) == [x * x for x in tasks]
    assert list(ordered_results(slow_square, tasks, workers=2)) == [x * x for x in tasks]


def test_no_more_than_two_tasks_a_worker_are_out_ahead_of_the_caller(monkeypatch):
    submitted = []

    class Pool(executor.ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(executor, "ProcessPoolExecutor", Pool)
    results = ordered_results(slow_square, list(range(20)), workers=2)
    assert next(results) == 0
    assert len(submitted) == 4  # two workers, two tasks each: the one read and three more
    results.close()  # leaving early cancels the rest
    assert len(submitted) < 20


def test_where_tasks_run_is_said_and_one_task_or_one_worker_stays_in_process():
    assert in_process(1, None, 10) and in_process(0, None, 1) and not in_process(2, None, 10)
    assert not in_process(1, "tcp://127.0.0.1:8786", 1)
    assert describe(2, None, 10) == "10 tasks on 2 worker processes"
    assert describe(0, "tcp://h:8786", 3) == "3 task(s) on the Dask cluster at tcp://h:8786"


@pytest.mark.parametrize("address", ["tcp://head:8786", "127.0.0.1:8786", "tls://10.0.0.2:8786", "[::1]:8786"])
def test_a_scheduler_address_is_taken(address):
    assert IngestConfig(cluster=address).cluster == address
    assert TokenizerConfig(cluster=address).cluster == address


@pytest.mark.parametrize("address", ["", "head", "http://head:8786", "tcp://head:port", "tcp://a b:8786"])
def test_anything_else_is_refused_naming_the_field(address):
    with pytest.raises(ConfigError, match=r"^cluster: must be a scheduler address like tcp://host:8786"):
        IngestConfig(cluster=address)


def test_progress_says_units_bytes_rate_and_eta(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ingest_module, "_PROGRESS_EVERY_S", 0.0)
    src = tmp_path / "src"
    src.mkdir()
    for f in range(3):
        (src / f"{f}.jsonl").write_text("".join(json.dumps({"text": f"file {f} line {i}"}) + "\n" for i in range(20)))
    with caplog.at_level(logging.INFO, logger="gptcore.data"):
        ingest(IngestConfig(sources=[str(src)], workers=1), tmp_path / "data")
    lines = [r.getMessage() for r in caplog.records if "source units" in r.getMessage()]
    assert "ingest: 1 documents" in lines[0] and "0/3 source units" in lines[0]
    assert "ETA" in lines[-1] and "2/3 source units" in lines[-1]  # a unit counts once its last document is out
    assert "ingest: reading and cleaning 3 task(s) in this process" in caplog.text


def die_once(task: tuple[str, int]) -> int:
    """Task 3 kills its worker process the first time it runs (as the OOM killer would)."""
    marker, x = Path(task[0]), task[1]
    if x == 3 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def test_a_worker_process_killed_mid_task_has_its_tasks_run_again(tmp_path, caplog):
    tasks = [(str(tmp_path / "died"), x) for x in range(10)]
    with caplog.at_level(logging.WARNING, logger="gptcore.data"):
        assert list(ordered_results(die_once, tasks, workers=2)) == [x * x for x in range(10)]
    assert (tmp_path / "died").exists()
    assert "a worker process died: running its" in caplog.text


def always_die(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_workers_that_keep_dying_end_the_run_with_an_error():
    with pytest.raises(RuntimeError, match=r"worker processes died 4 times; giving up"):
        list(ordered_results(always_die, list(range(4)), workers=2))
