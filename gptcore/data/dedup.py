"""Duplicate removal: exact (content hash) and near-duplicates (MinHash LSH, `datasketch`).

Exact: an 8-byte BLAKE2b digest per kept document, in a sorted numpy array with a small set
merged into it now and then, so a corpus of 10M documents costs 80 MB, not gigabytes of
Python objects. Near: a MinHash signature of word 5-gram shingles per document (`minhash`,
computed in the workers), fed in input order to `datasketch.MinHashLSH` in one process
(`NearDedup`); a document is dropped when its estimated Jaccard similarity to a kept one
reaches the threshold. The index holds the LSH bands of every kept document, about 3.2 KB a
document (3.0 GiB per million: bench/near_dedup.py), so near dedup is off by default.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

_MERGE_EVERY = 1 << 16
NUM_PERM, SHINGLE_WORDS = 128, 5
_SCHEME, _HASH_DTYPE = "affine32", np.uint32  # datasketch's default for a new MinHash: its hash values fit 32 bits


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


def minhash(text: str, num_perm: int = NUM_PERM, shingle_words: int = SHINGLE_WORDS) -> bytes:
    """The MinHash signature of the text's word shingles: `num_perm` uint32 as bytes.

    Computed where the document is cleaned (in the workers, `gptcore.data.reading`): it is the
    costly part of near dedup, and a pure function of the text, so only `NearDedup.seen`, cheap
    and in input order, stays in one process."""
    import xxhash
    from datasketch import MinHash

    words = text.split()
    n = shingle_words
    shingles = {" ".join(words[i : i + n]).encode("utf-8") for i in range(max(1, len(words) - n + 1))}
    sketch = MinHash(
        num_perm=num_perm, hashfunc=xxhash.xxh32_intdigest, permutations=_permutations(num_perm), scheme=_SCHEME
    )
    sketch.update_batch(list(shingles))
    return sketch.hashvalues.astype(_HASH_DTYPE).tobytes()


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int):
    """MinHash's random permutations, drawn once a process (from its fixed seed) rather than once a document."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm).permutations


class NearDedup:
    """The LSH index of the kept documents' signatures (`minhash`), fed in input order."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def seen(self, signature: bytes) -> bool:
        """Whether a kept document is a near-duplicate of the one with this signature; remembers it if not."""
        from datasketch import LeanMinHash

        sketch = LeanMinHash(seed=1, hashvalues=np.frombuffer(signature, dtype=_HASH_DTYPE), scheme=_SCHEME)
        if self.lsh.query(sketch):
            return True
        self.lsh.insert(str(self.count), sketch)
        self.count += 1
        return False
