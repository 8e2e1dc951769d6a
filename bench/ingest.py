"""Ingestion + tokenization end to end against the raw `tokenizers` library, on one machine.

    python bench/ingest.py --gb 1 [--workdir DIR] [--json out.json]

Generates a JSONL corpus of the given size (unique ~2 KB documents cut from the Shakespeare
plays), then, in a fresh process, runs the pipeline's ingest and tokenizer stages on it
(stream, clean, dedup, split to Parquet; train BPE on a sample; encode into shards on every
core) and records the wall time and the peak resident memory of that process and its workers
together. In the same run it times `Tokenizer.encode_batch` alone, with its own threads on
the same cores, over the same cleaned text with the same tokenizer: the raw library speed.
Prints MB/s for both and their ratio (end to end / raw).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
import json, sys, time
from gptcore.config import IngestConfig, TokenizerConfig
from gptcore.data.ingest import ingest
from gptcore.tokenizer import train_tokenizer
root = sys.argv[1]
t0 = time.perf_counter()
data = ingest(IngestConfig(sources=[root + "/corpus/*.jsonl"]), root + "/data")
t1 = time.perf_counter()
tok = train_tokenizer(TokenizerConfig(vocab_size=int(sys.argv[2])), root + "/data", root + "/tok")
t2 = time.perf_counter()
print(json.dumps({"ingest_s": t1 - t0, "tokenizer_s": t2 - t1, "documents": sum(data.documents.values()),
                  "clean_bytes": sum(data.bytes.values()), "tokens": sum(tok.tokens.values())}))
"""


class TreeMemory(threading.Thread):
    """Peak of the summed resident memory of a process and all its descendants, sampled every 50 ms.

    Not ru_maxrss: Linux carries a parent's peak into a forked child's, and a sum of per-process
    peaks overstates what was resident at once.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

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
            self.peak = max(self.peak, sum(self.rss(p) for p in self.tree(self.pid)))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="corpus size in GB of text (1 GB = 1e9 bytes)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--workdir", type=Path, help="keep the corpus and outputs here (default: a temporary directory)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gptcore-ingest-bench-"))
    corpus = root / "corpus"
    if not corpus.is_dir():
        print(f"generating {args.gb} GB of JSONL in {corpus} ...", flush=True)
        generate(corpus, int(args.gb * 1e9))
    corpus_bytes = sum(p.stat().st_size for p in corpus.glob("*.jsonl"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGES, str(root), str(args.vocab)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    memory = TreeMemory(proc.pid)
    memory.start()
    stdout, stderr = proc.communicate()
    memory.running = False
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(stderr[-4000:])
    stages = json.loads(stdout.strip().splitlines()[-1])
    raw_mb_per_s, text_bytes = raw_encode_mb_per_s(root / "data", root / "tok" / "tokenizer.json")
    workers = os.cpu_count() or 1
    e2e_s = stages["ingest_s"] + stages["tokenizer_s"]
    result = {
        "device": f"cpu ({workers} cores)",
        "corpus_bytes": corpus_bytes,
        "text_bytes": text_bytes,
        "documents": stages["documents"],
        "tokens": stages["tokens"],
        "ingest_s": round(stages["ingest_s"], 2),
        "tokenizer_s": round(stages["tokenizer_s"], 2),
        "process_wall_s": round(wall, 2),
        "mb_per_s": text_bytes / 1e6 / e2e_s,
        "raw_mb_per_s": raw_mb_per_s,
        "ratio": text_bytes / 1e6 / e2e_s / raw_mb_per_s,
        "peak_mem_bytes": memory.peak,
    }
    print(
        f"corpus {corpus_bytes / 1e9:.2f} GB JSONL ({text_bytes / 1e9:.2f} GB of text, {stages['documents']} documents)"
    )
    print(
        f"end to end: ingest {stages['ingest_s']:.1f} s + tokenizer {stages['tokenizer_s']:.1f} s "
        f"-> {result['mb_per_s']:.2f} MB/s of text"
    )
    print(f"raw encode_batch: {raw_mb_per_s:.2f} MB/s; ratio {result['ratio']:.3f}")
    print(
        f"peak memory (resident, the stage process and its {workers} encoding workers together): "
        f"{memory.peak / 2**20:.0f} MiB"
    )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
