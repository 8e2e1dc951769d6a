"""Duplicate removal: exact (content hash) and near-duplicates (MinHash LSH, `datasketch`).

Exact: an 8-byte BLAKE2b digest per kept document, in a sorted numpy array with a small set
merged into it now and then, so a corpus of 10M documents costs 80 MB, not gigabytes of
Python objects. Near: `datasketch.MinHashLSH` over word 5-gram shingles, a document dropped
when its estimated Jaccard similarity to a kept one reaches the threshold; it holds the LSH
bands of every kept document (of the order of a kilobyte each), so it is off by default.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MERGE_EVERY = 1 << 16


class ExactDedup:
    def __init__(self) -> None:
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def seen(self, text: str) -> bool:
        """Whether `text` was seen before; remembers it if not."""
        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
        if key in self.recent:
            return True
        # A numpy scalar, not an int: an int below 2**63 counts as int64, and comparing it with
        # the uint64 array would convert the whole array to float64 on every call.
        i = np.searchsorted(self.sorted, np.uint64(key))
        if i < len(self.sorted) and int(self.sorted[i]) == key:
            return True
        self.recent.add(key)
        if len(self.recent) >= _MERGE_EVERY:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent.clear()
        return False


class NearDedup:
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle_words: int = 5):
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.shingle_words, self.count = num_perm, shingle_words, 0

    def seen(self, text: str) -> bool:
        """Whether a kept document is a near-duplicate of `text`; remembers `text` if not."""
        import xxhash
        from datasketch import MinHash

        words = text.split()
        n = self.shingle_words
        shingles = {" ".join(words[i : i + n]).encode("utf-8") for i in range(max(1, len(words) - n + 1))}
        sketch = MinHash(num_perm=self.num_perm, hashfunc=xxhash.xxh32_intdigest)
        sketch.update_batch(list(shingles))
        if self.lsh.query(sketch):
            return True
        self.lsh.insert(str(self.count), sketch)
        self.count += 1
        return False
