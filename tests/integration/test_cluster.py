"""Ingest and tokenizer on a two-node Dask cluster on loopback: the same bytes as one process and
as every local core, and the same again when a node is killed mid-run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptcore.config import IngestConfig, TokenizerConfig
from gptcore.data import executor
from gptcore.data.ingest import ingest
from gptcore.data.tokenizer import train_tokenizer
from gptcore.errors import ConfigError
from gptcore.layout import INGEST_MANIFEST, SPLITS, TOKENS_MANIFEST
from gptcore.processes import free_port
from tests.conftest import SUBPROCESS_ENV

pytestmark = pytest.mark.slow
DASK = Path(sys.executable).with_name("dask")


def start_worker(address: str, name: str, log_dir: Path) -> subprocess.Popen:
    """A Dask worker process, a node of its own: one process, one thread."""
    args = [str(DASK), "worker", address, "--name", name, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
    with open(log_dir / f"{name}.log", "wb") as log:
        return subprocess.Popen(args, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)


def wait_for_workers(client, names: set[str], timeout_s: float = 60) -> dict[str, str]:
    """{name: address} once every named worker has joined."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        joined = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        if names <= joined.keys():
            return joined
        time.sleep(0.1)
    raise TimeoutError(f"workers {names - joined.keys()} did not join")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict]:
    """A Dask scheduler and two worker nodes, all on 127.0.0.1."""
    from distributed import Client

    log_dir = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = subprocess.Popen(
        [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        env=SUBPROCESS_ENV,
        stdout=(log_dir / "scheduler.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    nodes = [start_worker(address, name, log_dir) for name in ("node-a", "node-b")]
    client = Client(address, timeout=60, set_as_default=False)
    try:
        wait_for_workers(client, {"node-a", "node-b"})
        yield {"address": address, "client": client, "log_dir": log_dir}
    finally:
        client.close()
        for process in [*nodes, scheduler]:
            process.terminate()
            process.wait(timeout=30)


def make_corpus(src: Path, files: int = 6, lines: int = 40) -> None:
    """JSONL files with a metadata field and lines repeated across files (which copy dedup keeps
    depends on the order), a Parquet file of several row groups (a task each)."""
    src.mkdir()
    for f in range(files):
        records = [
            {"text": f"file {f}, line {i}: write to x{i}@example.com.\n", "topic": f"t{i % 3}"} for i in range(lines)
        ]
        records += [{"text": f"a line shared by every file, number {i}.\n", "topic": "shared"} for i in range(4)]
        speech = [f"word{i}" for i in range(120)]
        speech[f] = "changed"  # one word in 120 differs from file to file: near duplicates
        records.append({"text": " ".join(speech) + "\n", "topic": "speech"})
        (src / f"part{f:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    texts = [f"parquet row {i}: the same speech, another day.\n" for i in range(30)]
    pq.write_table(pa.table({"text": texts, "topic": ["pq"] * 30}), src / "rows.parquet", row_group_size=8)


def output_digests(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}


def test_ingest_and_tokenizer_write_the_same_bytes_on_one_worker_every_core_and_a_two_node_cluster(tmp_path, cluster):
    make_corpus(tmp_path / "src")
    ingest_cfg = IngestConfig(
        sources=[str(tmp_path / "src")],
        metadata_fields=["topic"],
        near_dedup=True,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    tok_cfg = TokenizerConfig(vocab_size=300, min_frequency=1, sample_bytes=20_000, shard_tokens=500)
    runs = {"one": {"workers": 1}, "local": {"workers": 0}, "cluster": {"cluster": cluster["address"]}}
    split_files = [f"{s}.parquet" for s in SPLITS] + [INGEST_MANIFEST]
    digests = {}
    for name, where in runs.items():
        data, tok = tmp_path / name / "data", tmp_path / name / "tokenizer"
        ingest(replace(ingest_cfg, **where), data)
        tokens = train_tokenizer(replace(tok_cfg, **where), data, tok)
        shards = json.loads((tok / TOKENS_MANIFEST).read_text(encoding="utf-8"))["splits"]
        digests[name] = {
            "splits": output_digests(data, split_files),
            "shards": {s: [(sh["file"], sh["sha256"]) for sh in shards[s]["shards"]] for s in SPLITS},
            "tokens": tokens.digest,
        }
    assert len(digests["one"]["shards"]["train"]) > 1  # several shards, cut at the same tokens
    assert digests["local"] == digests["one"]
    assert digests["cluster"] == digests["one"]
    manifest = json.loads((tmp_path / "cluster" / "data" / INGEST_MANIFEST).read_text(encoding="utf-8"))
    assert manifest["counts"]["dropped_duplicate"] == 4 * 5  # 4 shared lines in 5 later files
    assert manifest["counts"]["dropped_near_duplicate"] == 5  # the speech, signed on the nodes, kept once
    assert "cluster" not in manifest["config"]  # where it ran is not what it made


def test_a_node_killed_mid_run_has_its_tasks_redone_and_the_output_is_the_same(tmp_path, cluster):
    make_corpus(tmp_path / "src", files=24, lines=60)
    cfg = IngestConfig(sources=[str(tmp_path / "src")], filters=["tests.integration.slow_filter:keep_slowly"])
    ingest(replace(cfg, workers=1), tmp_path / "one")
    client = cluster["client"]
    victim = start_worker(cluster["address"], "node-victim", cluster["log_dir"])
    victim_address = wait_for_workers(client, {"node-victim"})["node-victim"]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            ingest(replace(cfg, cluster=cluster["address"]), tmp_path / "cluster")
        except BaseException as e:  # reported by the test's thread below
            failure.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not client.processing(workers=[victim_address]).get(victim_address):  # a task running on it
            assert time.monotonic() < deadline and thread.is_alive(), "no task ever reached the victim node"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        thread.join(timeout=300)
    finally:
        victim.kill()
    assert not thread.is_alive() and not failure, failure
    names = [f"{s}.parquet" for s in SPLITS] + [INGEST_MANIFEST]
    assert output_digests(tmp_path / "cluster", names) == output_digests(tmp_path / "one", names)
    assert not list(tmp_path.glob("cluster/.spill-*"))


def test_an_unreachable_scheduler_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "_CONNECT_TIMEOUT_S", 2)
    make_corpus(tmp_path / "src", files=2, lines=5)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError, match=r"cluster: cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:\d+'"):
        ingest(IngestConfig(sources=[str(tmp_path / "src")], cluster=address), tmp_path / "data")
    assert not (tmp_path / "data").exists()
