"""Ingestion + tokenization end to end, on one process, every local core and a loopback cluster,
against the raw `tokenizers` library.

    python bench/ingest.py --gb 1 [--workdir DIR] [--workers 1 2] [--nodes 2] [--json out.json]

Generates a JSONL corpus of the given size (unique ~2 KB documents cut from the Shakespeare
plays), then, for each worker count and for a Dask cluster of `--nodes` single-core worker
nodes started on 127.0.0.1 (0: none), runs the pipeline's ingest and tokenizer stages on it in a
fresh process (stream, clean, dedup, split to Parquet; train BPE on a sample; encode into
shards), recording the wall time and the peak resident memory of the stage process and every
worker together, and of the largest worker alone. Every run must write the same split and shard
digests. In the same run it times `Tokenizer.encode_batch` alone, with its own threads on all
cores, over the same cleaned text with the same tokenizer: the raw library speed. Prints a row a
run: MB/s of text end to end, the speed-up over one process, the ratio to raw encoding, and
how long ingest's process waited for the workers' tasks (what is left, divided into the text, is
the rate of its one merging process, dedup + split + writing: ingest's ceiling on any number of
workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.data.sources import read_shakespeare

STAGES = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from gptcore.config import IngestConfig, TokenizerConfig
from gptcore.data.ingest import ingest
from gptcore.data.tokenizer import train_tokenizer
corpus, out, vocab, workers, cluster = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] or None
t0 = time.perf_counter()
data = ingest(IngestConfig(sources=[corpus + "/*.jsonl"], workers=workers, cluster=cluster), out + "/data")
t1 = time.perf_counter()
tok = train_tokenizer(TokenizerConfig(vocab_size=vocab, workers=workers, cluster=cluster), out + "/data", out + "/tok")
t2 = time.perf_counter()
print(json.dumps({"ingest_s": t1 - t0, "tokenizer_s": t2 - t1, "documents": sum(data.documents.values()),
                  "clean_bytes": sum(data.bytes.values()), "tokens": sum(tok.tokens.values()),
                  "data_digest": data.digest, "tokens_digest": tok.digest}))
"""


class TreeMemory(threading.Thread):
    """Peaks of resident memory, sampled every 50 ms: the sum over some processes and all their
    descendants, and the largest single worker (any of them but `not_workers`: the stage process
    itself, a scheduler, a worker's supervising nanny).

    Not ru_maxrss: Linux carries a parent's peak into a forked child's, and a sum of per-process
    peaks overstates what was resident at once.
    """

    def __init__(self, roots: list[int], not_workers: set[int]):
        super().__init__(daemon=True)
        self.roots, self.not_workers, self.peak, self.worker_peak, self.running = roots, not_workers, 0, 0, True

    def tree(self, pid: int) -> list[int]:
        try:
            children = [
                int(c)
                for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()
            ]
        except OSError:
            return []
        return [pid] + [p for c in children for p in self.tree(c)]

    @staticmethod
    def rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                line = next(ln for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return 0
        return int(line.split()[1]) * 1024

    def run(self) -> None:
        while self.running:
            sizes = {p: self.rss(p) for root in self.roots for p in self.tree(root)}
            self.peak = max(self.peak, sum(sizes.values()))
            workers = [size for p, size in sizes.items() if p not in self.not_workers]
            self.worker_peak = max([self.worker_peak, *workers])
            time.sleep(0.05)


def generate(out: Path, total_bytes: int, seed: int = 0) -> int:
    """JSONL files of unique ~2 KB documents from the plays; returns the bytes of text written."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for doc in read_shakespeare() for line in doc.text.splitlines() if line.strip()]
    rng = random.Random(seed)
    written, n, part = 0, 0, 0
    while written < total_bytes:
        with open(out / f"part-{part:03d}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(32_768):
                start = rng.randrange(len(lines) - 80)
                text = f"Document {n}.\n" + "\n".join(lines[start : start + rng.randint(40, 80)]) + "\n"
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode("utf-8"))
                n += 1
                if written >= total_bytes:
                    break
        part += 1
    return written


def raw_encode_mb_per_s(data_dir: Path, tokenizer_json: Path) -> tuple[float, int]:
    """encode_batch alone (the library's own threads) over the cleaned splits, in batches of 4096."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    tok = Tokenizer.from_file(str(tokenizer_json))
    seconds, n_bytes = 0.0, 0
    for split in ("train", "val", "test"):
        for batch in pq.ParquetFile(data_dir / f"{split}.parquet").iter_batches(batch_size=4096, columns=["text"]):
            texts = batch.column(0).to_pylist()
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            start = time.perf_counter()
            tok.encode_batch(texts, add_special_tokens=False)
            seconds += time.perf_counter() - start
    return n_bytes / 1e6 / seconds, n_bytes


class LoopbackCluster:
    """A Dask scheduler and `nodes` single-core worker nodes on 127.0.0.1, as `dask` starts them."""

    def __init__(self, nodes: int, log_dir: Path):
        from distributed import Client

        from gptcore.processes import free_port

        dask = Path(sys.executable).with_name("dask")
        self.address = f"tcp://127.0.0.1:{free_port()}"
        logs = {"stdout": open(log_dir / "dask.log", "ab"), "stderr": subprocess.STDOUT}  # noqa: SIM115 (held open)
        port = self.address.rsplit(":", 1)[1]
        self.scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", port], **logs)
        node = [dask, "worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
        self.nodes = [subprocess.Popen(node, **logs) for _ in range(nodes)]
        with Client(self.address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(nodes, timeout=120)

    def stop(self) -> None:
        for p in [*self.nodes, self.scheduler]:
            p.terminate()
            p.wait(timeout=60)


def run_stages(root: Path, name: str, vocab: int, workers: int, cluster: LoopbackCluster | None) -> dict:
    """One run of ingest + tokenizer in a fresh process; its timings, digests and memory peaks."""
    out = root / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    address = cluster.address if cluster else ""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGES, str(root / "corpus"), str(out), str(vocab), str(workers), address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    helpers = [cluster.scheduler.pid, *(n.pid for n in cluster.nodes)] if cluster else []
    memory = TreeMemory([proc.pid, *helpers], {proc.pid, *helpers})
    memory.start()
    stdout, stderr = proc.communicate()
    memory.running = False
    if proc.returncode != 0:
        sys.exit(f"{name}: {stderr[-4000:]}")
    stages = json.loads(stdout.strip().splitlines()[-1])
    # the stage's own account: how long its process waited for the workers' tasks
    stages["ingest_wait_s"] = float(re.search(r"s, ([\d.]+)s of it waiting for the workers", stderr).group(1))
    return stages | {"wall_s": time.perf_counter() - start, "peak": memory.peak, "worker_peak": memory.worker_peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="corpus size in GB of text (1 GB = 1e9 bytes)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="local worker counts to run (1: one process)")
    p.add_argument("--nodes", type=int, default=2, help="worker nodes of the loopback Dask cluster (0: no cluster run)")
    p.add_argument("--workdir", type=Path, help="keep the corpus and outputs here (default: a temporary directory)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gptcore-ingest-bench-"))
    corpus = root / "corpus"
    if not corpus.is_dir():
        print(f"generating {args.gb} GB of JSONL in {corpus} ...", flush=True)
        generate(corpus, int(args.gb * 1e9))
    corpus_bytes = sum(p.stat().st_size for p in corpus.glob("*.jsonl"))
    plan = [(f"workers-{w}", w, 1, 0) for w in args.workers] + (
        [("cluster", args.nodes, args.nodes, args.nodes)] if args.nodes else []
    )
    runs = []
    for name, workers, nodes, cluster_nodes in plan:
        print(f"{name}: ingest + tokenizer ...", flush=True)
        cluster = LoopbackCluster(cluster_nodes, root) if cluster_nodes else None
        try:
            runs.append((name, workers, nodes, run_stages(root, name, args.vocab, workers, cluster)))
        finally:
            if cluster:
                cluster.stop()
    first = runs[0][3]
    raw_mb_per_s, text_bytes = raw_encode_mb_per_s(
        root / "runs" / runs[0][0] / "data", root / "runs" / runs[0][0] / "tok" / "tokenizer.json"
    )
    print(
        f"corpus {corpus_bytes / 1e9:.2f} GB JSONL ({text_bytes / 1e9:.2f} GB of text, {first['documents']} documents)"
    )
    print(f"raw encode_batch on {os.cpu_count()} cores: {raw_mb_per_s:.2f} MB/s")
    print(
        f"{'run':12}{'workers':>8}{'nodes':>6}{'ingest s':>10}{'tok s':>8}{'MB/s':>7}{'speed-up':>9}{'/raw':>6}"
        f"{'peak MiB':>9}{'worker MiB':>11}{'wait s':>8}{'merge MB/s':>11}  same"
    )
    rows = []
    base_s = first["ingest_s"] + first["tokenizer_s"]
    for name, workers, nodes, r in runs:
        seconds = r["ingest_s"] + r["tokenizer_s"]
        same = (r["data_digest"], r["tokens_digest"]) == (first["data_digest"], first["tokens_digest"])
        row = {
            "run": name,
            "workers": workers,
            "nodes": nodes,
            "ingest_s": round(r["ingest_s"], 2),
            "tokenizer_s": round(r["tokenizer_s"], 2),
            "mb_per_s": text_bytes / 1e6 / seconds,
            "raw_mb_per_s": raw_mb_per_s,
            "ratio_to_raw": text_bytes / 1e6 / seconds / raw_mb_per_s,
            "speedup": base_s / seconds,
            # the one process that dedups, splits and writes, alone: ingest's ceiling on any number of workers
            "ingest_wait_s": round(r["ingest_wait_s"], 2),
            "merge_mb_per_s": text_bytes / 1e6 / max(r["ingest_s"] - r["ingest_wait_s"], 1e-9),
            "peak_mem_bytes": r["peak"],
            "peak_worker_mem_bytes": r["worker_peak"],
            "same_digests": same,
            "corpus_bytes": corpus_bytes,
            "text_bytes": text_bytes,
            "documents": r["documents"],
            "tokens": r["tokens"],
        }
        rows.append(row)
        print(
            f"{name:12}{workers:8}{nodes:6}{r['ingest_s']:10.1f}{r['tokenizer_s']:8.1f}{row['mb_per_s']:7.2f}"
            f"{row['speedup']:9.2f}{row['ratio_to_raw']:6.2f}{r['peak'] / 2**20:9.0f}"
            f"{r['worker_peak'] / 2**20:11.0f}{r['ingest_wait_s']:8.1f}{row['merge_mb_per_s']:11.1f}  {same}"
        )
    if args.json:
        write_json(args.json, rows)
    if not all(row["same_digests"] for row in rows):
        sys.exit("the runs wrote different outputs")


if __name__ == "__main__":
    main()
