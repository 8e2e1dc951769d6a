"""Byte-level BPE with Hugging Face `tokenizers`, trained on a sample of the train split, and token shards.

Output (written to a temporary directory, then renamed into place):
    OUT/tokenizer.json        loads with `tokenizers.Tokenizer.from_file`
    OUT/{split}_NNNNN.bin     token shards of each split (`gptcore.data.shards`), documents joined
                              by <|endoftext|>, uint16 when the vocabulary fits, else uint32
    OUT/tokens.json           dtype; per split token/byte/document counts and every shard with its
                              token count and sha256; the tokenizer and data digests; the sample;
                              the source files with their sha256 (from the ingest manifest)

The initial alphabet is all 256 bytes and there is no normaliser, so any UTF-8 text encodes
and decodes back exactly. Re-running on the same ingested corpus, config and code does no work.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gptcore.config import TokenizerConfig
from gptcore.data.lineage import fingerprint, output_config, up_to_date
from gptcore.data.shards import encode_splits
from gptcore.fsutil import atomic_dir, sha256_file, write_json
from gptcore.layout import EOT, PAD, SPECIAL_TOKENS, SPLITS, TOKENIZER_FILE, TOKENS_MANIFEST
from gptcore.results import TokenizerResult, load_ingest, load_tokenized
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.tokenizer")


def new_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on an iterable of strings."""
    from tokenizers import pre_tokenizers, trainers

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sample_texts(path: Path, every: int) -> Iterator[str]:
    """Every `every`-th document of a split's Parquet file, read a row group at a time.

    Row groups, not `iter_batches`: its default batches of 65536 rows hold hundreds of MB of
    text at once, and only the sampled rows become Python strings.
    """
    import pyarrow.parquet as pq

    f, row = pq.ParquetFile(path), 0
    for group in range(f.num_row_groups):
        column = f.read_row_group(group, columns=["text"]).column(0)
        picked = list(range(-row % every, len(column), every))
        row += len(column)
        yield from column.take(picked).to_pylist()


class EncodeProgress:
    """A log line every ~10 s while encoding: bytes done, MB/s, ETA."""

    def __init__(self, total_bytes: int):
        self.total, self.done, self.start, self.last = total_bytes, 0, time.perf_counter(), 0.0

    def __call__(self, n_bytes: int) -> None:
        self.done += n_bytes
        now = time.perf_counter()
        if now - self.last >= 10 or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info(
                "tokenizer: encoded %.1f/%.1f MB, %.1f MB/s, ETA %.0fs",
                self.done / 1e6,
                self.total / 1e6,
                rate / 1e6,
                max(self.total - self.done, 0) / max(rate, 1e-9),
            )


def train_tokenizer(
    cfg: TokenizerConfig, data_dir: str | Path, out_dir: str | Path, tracking: Tracking | None = None
) -> TokenizerResult:
    """Train BPE on a sample of the train split of `data_dir`, then encode every split into shards in `out_dir`."""
    start = time.perf_counter()
    corpus = load_ingest(data_dir)
    out_dir = Path(out_dir)
    key = fingerprint(None, output_config(cfg), [__name__, "gptcore.data.shards"], inputs=[corpus.digest])
    if up_to_date(out_dir / TOKENS_MANIFEST, key):
        result = load_tokenized(out_dir)
        log.info(
            "tokenizer: corpus %s, config and code unchanged since %s was written: nothing to do",
            corpus.digest[:12],
            out_dir,
        )
        with stage_run(
            tracking, "tokenizer", tags={"gptcore.data_digest": corpus.digest, "gptcore.cached": True}
        ) as run:
            run.log_dataset(out_dir / TOKENS_MANIFEST, result.digest, name="tokens")
        return result
    with stage_run(tracking, "tokenizer", tags={"gptcore.data_digest": corpus.digest}) as run:
        run.log_params(asdict(cfg))
        every = max(1, math.ceil(corpus.bytes["train"] / cfg.sample_bytes))
        sample = {"every": every, "documents": math.ceil(corpus.documents["train"] / every)}
        workers = cfg.workers or os.cpu_count() or 1
        with atomic_dir(out_dir) as tmp:
            tok = train_bpe(sample_texts(corpus.split_path("train"), every), cfg.vocab_size, cfg.min_frequency)
            tok.save(str(tmp / TOKENIZER_FILE))
            vocab_size, eot_id, dtype = tok.get_vocab_size(), tok.token_to_id(EOT), token_dtype(tok.get_vocab_size())
            log.info(
                "tokenizer: trained %d-token BPE on every %d-th train document (%d of %d) in %.1fs",
                vocab_size,
                every,
                sample["documents"],
                corpus.documents["train"],
                time.perf_counter() - start,
            )
            splits = encode_splits(
                {s: corpus.split_path(s) for s in SPLITS},
                tmp / TOKENIZER_FILE,
                eot_id,
                dtype,
                tmp,
                cfg.shard_tokens,
                workers,
                EncodeProgress(sum(corpus.bytes.values())),
                cfg.cluster,
            )
            for split, st in splits.items():
                st["bytes_per_token"] = st["bytes"] / max(st["tokens"], 1)
                log.info(
                    "tokenizer: %s: %d documents -> %d tokens in %d shard(s) (%.2f bytes/token)",
                    split,
                    st["documents"],
                    st["tokens"],
                    len(st["shards"]),
                    st["bytes_per_token"],
                )
            digest = hashlib.sha256("".join(sh["sha256"] for s in SPLITS for sh in splits[s]["shards"]).encode())
            write_json(
                tmp / TOKENS_MANIFEST,
                {
                    "vocab_size": vocab_size,
                    "dtype": dtype.name,
                    "eot_id": eot_id,
                    "pad_id": tok.token_to_id(PAD),
                    "data_digest": corpus.digest,
                    "tokenizer_digest": sha256_file(tmp / TOKENIZER_FILE),
                    "digest": digest.hexdigest(),
                    "sample": sample,
                    "workers": workers,
                    "splits": splits,
                    "sources": corpus.sources,
                    "fingerprint": key,
                },
            )
        result = load_tokenized(out_dir)
        run.set_tags({"gptcore.tokenizer_digest": result.tokenizer_digest, "gptcore.tokens_digest": result.digest})
        total = sum(st["bytes"] for st in splits.values())
        run.log_metrics(
            {
                "tokenizer/vocab_size": vocab_size,
                "tokenizer/val_bytes_per_token": result.bytes_per_token["val"],
                "tokenizer/seconds": time.perf_counter() - start,
                "tokenizer/mb_per_s": total / 1e6 / (time.perf_counter() - start),
            }
            | {f"tokens/{s}": n for s, n in result.tokens.items()}
        )
        run.log_artifact(result.tokenizer_path)
        run.log_dataset(out_dir / TOKENS_MANIFEST, result.digest, name="tokens")
    return result
