"""Which cluster engine carries the data stages: Dask distributed against Ray, two nodes on loopback.

    pip install ray            # Ray is not a dependency of gptcore; this measurement needs it
    python bench/cluster_engines.py [--json out.json]

For each engine, in one run on this machine: a head (scheduler) and two worker nodes of one CPU
each are started as the engine's own command-line tools start them; then it times the cluster's
start until both nodes take work, the memory the idle cluster holds (resident, every process of
it), the round trip of 500 empty tasks, 40 tasks of ~60 ms of Python each (the shape of ingest's
tasks: pure functions, a file each), and one 64 MB result coming back. The serial time of the
40 tasks in this process is the reference for their speed-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.processes import free_port

BIN = Path(sys.executable).parent


def busy(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def noop(i: int) -> int:
    return i


def blob() -> bytes:
    return b"x" * (64 << 20)


def resident(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            pass
    return total


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dask_row(work: int) -> dict:
    from distributed import Client

    address, started = f"tcp://127.0.0.1:{free_port()}", time.perf_counter()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    head = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        **quiet,
    )
    node = [BIN / "dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
    nodes = [subprocess.Popen(node, **quiet) for _ in range(2)]
    try:
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            start_s = time.perf_counter() - started
            time.sleep(1)
            return {
                "engine": "dask",
                "start_s": start_s,
                "idle_mem_bytes": resident([psutil.Process(p.pid) for p in [head, *nodes]]),
                "task_overhead_ms": timed(
                    lambda: client.gather([client.submit(noop, i, pure=False) for i in range(500)])
                )
                * 2,
                "tasks_40_s": timed(lambda: client.gather([client.submit(busy, work, pure=False) for _ in range(40)])),
                "result_64mb_s": timed(lambda: client.submit(blob, pure=False).result()),
            }
    finally:
        for p in [*nodes, head]:
            p.terminate()
            p.wait()


def ray_row(work: int) -> dict:
    import ray

    ray_cli, port, started = str(BIN / "ray"), free_port(), time.perf_counter()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"], **quiet)
    try:
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"], **quiet)
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        remote_noop, remote_busy = ray.remote(num_cpus=1)(noop), ray.remote(num_cpus=1)(busy)
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            time.sleep(0.1)
        ray.get(remote_noop.remote(0))  # both nodes up and a task through
        start_s = time.perf_counter() - started
        time.sleep(1)
        mine = {os.getpid()}
        cluster = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "ray" in " ".join(p.info["cmdline"] or []) and p.pid not in mine
        ]
        return {
            "engine": "ray",
            "start_s": start_s,
            "idle_mem_bytes": sum(p.memory_info().rss for p in cluster if p.is_running()),
            "task_overhead_ms": timed(lambda: ray.get([remote_noop.remote(i) for i in range(500)])) * 2,
            "tasks_40_s": timed(lambda: ray.get([remote_busy.remote(work) for _ in range(40)])),
            "result_64mb_s": timed(lambda: ray.get(ray.remote(blob).remote())),
        }
    finally:
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if shutil.which("ray", path=str(BIN)) is None:
        sys.exit("Ray is not installed in this environment: pip install ray")
    work = 1_000_000
    serial_s = timed(lambda: [busy(work) for _ in range(40)])
    rows = [dask_row(work), ray_row(work)]
    print(f"40 tasks serially in this process: {serial_s:.2f} s")
    print(f"{'engine':8}{'start s':>9}{'idle MiB':>10}{'ms/task':>9}{'40 tasks s':>12}{'speed-up':>10}{'64 MB s':>9}")
    for row in rows:
        row["speedup_40_tasks"] = serial_s / row["tasks_40_s"]
        print(
            f"{row['engine']:8}{row['start_s']:9.1f}{row['idle_mem_bytes'] / 2**20:10.0f}{row['task_overhead_ms']:9.2f}"
            f"{row['tasks_40_s']:12.2f}{row['speedup_40_tasks']:10.2f}{row['result_64mb_s']:9.2f}"
        )
    if args.json:
        write_json(args.json, {"serial_40_tasks_s": serial_s, "rows": rows})


if __name__ == "__main__":
    main()
