"""Where the data stages' tasks run: in this process, in worker processes of this machine, or on a Dask cluster.

`ordered_results(fn, tasks, workers, cluster)` yields `fn(task)` for every task, in the order of
the tasks, whatever order they finish in, so what the caller writes is the same bytes for any
worker count or cluster. At most `_AHEAD_PER_WORKER` tasks a worker are out beyond the one the
caller waits on: memory holds a few tasks' results, not the corpus's.

- `cluster` unset (the default, embedded): `workers` spawned processes of this machine (0: one
  per core); with one worker, or one task, the tasks run in this process (no start-up cost). A
  worker process that dies has its unfinished tasks run again on new processes (three times).
- `cluster` set: the address of a Dask scheduler (`tcp://host:8786`). Its workers run the tasks;
  a worker lost mid-task has its tasks run again on another (Dask's own retry of lost work), and
  as every task is a pure function of its input, the output does not change. The workers must
  import the same gptcore and see the same paths (sources and work directory on a shared
  filesystem), as torchrun's nodes do. Dask sends functions and results as pickles: point
  `cluster` only at a scheduler you run, as you would not run code from anywhere else.
Why Dask and not Ray or datatrove: docs/pipeline.md ("Past one machine"), measured by
bench/cluster_engines.py.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from gptcore.errors import ConfigError

log = logging.getLogger("gptcore.data")

_AHEAD_PER_WORKER = 2  # one running, one waiting: a worker never idles while the caller reads
_POOL_RENEWALS = 3  # worker processes lost, then new ones started, before a run gives up
_CONNECT_TIMEOUT_S = 30


def ordered_results(
    fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int = 0, cluster: str | None = None
) -> Iterator[Any]:
    """fn(task) of every task, in order. Close the iterator when leaving early: that cancels the rest."""
    if cluster:
        yield from _on_cluster(fn, tasks, cluster)
        return
    if in_process(workers, cluster, len(tasks)):
        yield from map(fn, tasks)
        return
    yield from _on_local_pool(fn, tasks, min(workers or os.cpu_count() or 1, len(tasks)))


class _LocalPool:
    """Spawned worker processes, renewed when one dies: a killed process (the OOM killer, a signal)
    breaks a ProcessPoolExecutor for good, and the tasks it held are run again on a new pool."""

    def __init__(self, workers: int):
        self.workers, self.renewals = workers, 0
        self.pool = self.new()

    def new(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent may hold threads (MLflow, Prefect) that a forked child would inherit stopped.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def renew(self, unfinished: int) -> Callable:
        self.renewals += 1
        if self.renewals > _POOL_RENEWALS:
            raise RuntimeError(f"worker processes died {self.renewals} times; giving up (see the log for why)")
        log.warning("a worker process died: running its %d unfinished task(s) again on new workers", unfinished)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self.new()
        return self.pool.submit


def _on_local_pool(fn: Callable, tasks: Sequence[Any], workers: int) -> Iterator[Any]:
    local = _LocalPool(workers)
    try:
        yield from _bounded(local.pool.submit, fn, tasks, workers * _AHEAD_PER_WORKER, local.renew)
    finally:
        local.pool.shutdown(wait=True, cancel_futures=True)  # no task still runs once the caller moves on


def _bounded(
    submit: Callable, fn: Callable, tasks: Sequence[Any], ahead: int, renew: Callable | None = None
) -> Iterator[Any]:
    """fn(task) of every task in order, at most `ahead` submitted; `renew(unfinished)` gives a new
    `submit` when the pool breaks, and what had not finished is submitted again."""
    pending: deque[tuple[int, Any]] = deque()  # (task index, future)
    next_task = 0
    try:
        while pending or next_task < len(tasks):
            while len(pending) < ahead and next_task < len(tasks):
                pending.append((next_task, submit(fn, tasks[next_task])))
                next_task += 1
            try:
                result = pending[0][1].result()
            except BrokenProcessPool:
                if renew is None:
                    raise
                lost = [n for n, future in pending if not _succeeded(future)]
                submit = renew(len(lost))
                pending = deque((n, submit(fn, tasks[n]) if n in lost else future) for n, future in pending)
                continue
            pending.popleft()
            yield result
    finally:
        for _, future in pending:
            future.cancel()


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _on_cluster(fn: Callable, tasks: Sequence[Any], address: str) -> Iterator[Any]:
    try:
        from distributed import Client
    except ImportError:  # a dependency of gptcore: missing only from a broken install
        raise ConfigError("cluster: needs the `distributed` package (pip install distributed)") from None
    try:
        client = Client(address, timeout=_CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(f"cluster: cannot reach the Dask scheduler at {address!r} ({e})") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=_CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConfigError(f"cluster: the Dask scheduler at {address!r} has no workers") from None
        n_workers = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
        # pure=False: a task is run even if one with equal arguments ran before (its files may be gone)
        yield from _bounded(lambda f, t: client.submit(f, t, pure=False), fn, tasks, n_workers * _AHEAD_PER_WORKER)


def in_process(workers: int, cluster: str | None, tasks: int) -> bool:
    """Whether `ordered_results` runs the tasks in this process."""
    return not cluster and min(workers or os.cpu_count() or 1, tasks) <= 1


def describe(workers: int, cluster: str | None, tasks: int) -> str:
    """Where the tasks run, for the log."""
    if cluster:
        return f"{tasks} task(s) on the Dask cluster at {cluster}"
    if in_process(workers, cluster, tasks):
        return f"{tasks} task(s) in this process"
    return f"{tasks} tasks on {min(workers or os.cpu_count() or 1, tasks)} worker processes"
