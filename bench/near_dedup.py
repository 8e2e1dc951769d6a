"""Near dedup's two halves measured apart: MinHash signatures (in the workers) and the LSH index
(in the parent, in input order), with the index's memory per million documents.

    python bench/near_dedup.py [--documents 200000] [--json out.json]

Signs `--documents` distinct ~2 KB documents cut from the plays (as bench/ingest.py makes them)
with `gptcore.data.dedup.minhash` in this one process (documents/s a core), then feeds the
signatures to `NearDedup.seen` as ingest's parent does (documents/s: the ceiling of the merge,
whatever the number of workers), measuring the index's memory with tracemalloc (every Python
allocation it holds, not the process's resident size), per document and per million.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.data.dedup import NearDedup, minhash
from gptcore.data.sources import read_shakespeare


def documents(n: int, seed: int = 0) -> list[str]:
    lines = [line for doc in read_shakespeare() for line in doc.text.splitlines() if line.strip()]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(len(lines) - 80)
        out.append(f"Document {i}.\n" + "\n".join(lines[start : start + rng.randint(40, 80)]) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=200_000)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    texts = documents(args.documents)
    start = time.perf_counter()
    signatures = [minhash(t) for t in texts]
    sign_s = time.perf_counter() - start
    del texts
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    near = NearDedup(args.threshold)
    start = time.perf_counter()
    dropped = sum(near.seen(s) for s in signatures)
    merge_s = time.perf_counter() - start
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    kept = args.documents - dropped
    result = {
        "documents": args.documents,
        "kept": kept,
        "threshold": args.threshold,
        "sign_docs_per_s": args.documents / sign_s,
        "merge_docs_per_s": args.documents / merge_s,
        "index_bytes": index_bytes,
        "index_bytes_per_document": index_bytes / kept,
        "index_bytes_per_million_documents": index_bytes / kept * 1e6,
        "signature_bytes": len(signatures[0]),
    }
    print(f"signatures: {result['sign_docs_per_s']:.0f} documents/s on one core ({len(signatures[0])} bytes each)")
    print(f"LSH merge (one process, input order): {result['merge_docs_per_s']:.0f} documents/s")
    print(
        f"LSH index: {index_bytes / 2**20:.0f} MiB for {kept} kept documents: "
        f"{result['index_bytes_per_document']:.0f} bytes each, "
        f"{result['index_bytes_per_million_documents'] / 2**30:.2f} GiB per million (tracemalloc; dropped {dropped})"
    )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
