"""Byte-level BPE with Hugging Face `tokenizers`, trained on the train split only, and token files.

Output (written to a temporary directory, then renamed into place):
    OUT/tokenizer.json       loads with `tokenizers.Tokenizer.from_file`
    OUT/{train,val,test}.bin token ids of each split, documents joined by <|endoftext|>,
                             uint16 when the vocabulary fits, else uint32 (read with np.memmap)
    OUT/tokens.json          dtype, token/byte/document counts per split, digests

The initial alphabet is all 256 bytes and there is no normaliser, so any UTF-8 text encodes
and decodes back exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptcore.config import TokenizerConfig
from gptcore.data.ingest import SPLITS, load_ingest, read_split
from gptcore.errors import InputError
from gptcore.fsutil import atomic_dir, read_stage_output, sha256_file, write_json
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.tokenizer")

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]
_ENCODE_CHUNK = 256  # documents per encode_batch call: bounded memory, all cores busy


@dataclass
class TokenizerResult:
    out_dir: str
    tokenizer_path: str
    vocab_size: int
    dtype: str
    tokens: dict[str, int]
    bytes_per_token: dict[str, float]
    tokenizer_digest: str
    data_digest: str

    def tokens_path(self, split: str) -> Path:
        return Path(self.out_dir) / f"{split}.bin"


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


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{path}: tokenizer not found; run `gptcore tokenizer` first")
    return Tokenizer.from_file(str(path))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def token_byte_lengths(tok) -> np.ndarray:
    """Bytes each token id stands for (0 for special tokens): the basis of bits per byte.

    In a byte-level vocabulary each character of a token's string stands for exactly one byte.
    """
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    specials = set(SPECIAL_TOKENS)
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if token in specials else len(token)
    return lengths


def encode_documents(tok, texts: list[str], eot_id: int) -> np.ndarray:
    """All documents' ids, each followed by <|endoftext|>, as one int64 array.

    A literal `<|endoftext|>` inside a document is encoded as text, not as the special token:
    only the boundaries between documents are <|endoftext|> ids.
    """
    parts = []
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        for i in range(0, len(texts), _ENCODE_CHUNK):
            for enc in tok.encode_batch(texts[i : i + _ENCODE_CHUNK], add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=np.int64))
                parts.append(np.asarray([eot_id], dtype=np.int64))
    finally:
        tok.encode_special_tokens = previous
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def train_tokenizer(
    cfg: TokenizerConfig, data_dir: str | Path, out_dir: str | Path, tracking: Tracking | None = None
) -> TokenizerResult:
    """Train BPE on the train split of `data_dir`, then encode every split into `out_dir`."""
    start = time.perf_counter()
    corpus = load_ingest(data_dir)
    out_dir = Path(out_dir)
    with stage_run(tracking, "tokenizer", tags={"gptcore.data_digest": corpus.digest}) as run:
        run.log_params(asdict(cfg))
        train_texts = read_split(data_dir, "train", ["text"]).column("text").to_pylist()
        tok = train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency)
        vocab_size = tok.get_vocab_size()
        eot_id = tok.token_to_id(EOT)
        dtype = token_dtype(vocab_size)
        lengths = token_byte_lengths(tok)
        log.info("tokenizer: trained %d-token BPE on %d documents in %.1fs", vocab_size, len(train_texts),
                 time.perf_counter() - start)
        manifest = {"vocab_size": vocab_size, "dtype": dtype.name, "eot_id": eot_id, "pad_id": tok.token_to_id(PAD),
                    "data_digest": corpus.digest, "splits": {}}
        with atomic_dir(out_dir) as tmp:
            tok.save(str(tmp / "tokenizer.json"))
            for split in SPLITS:
                texts = train_texts if split == "train" else read_split(data_dir, split, ["text"]).column("text").to_pylist()
                ids = encode_documents(tok, texts, eot_id)
                ids.astype(dtype).tofile(tmp / f"{split}.bin")
                n_bytes = int(lengths[ids].sum())
                manifest["splits"][split] = {"tokens": int(ids.size), "bytes": n_bytes, "documents": len(texts),
                                             "bytes_per_token": n_bytes / max(ids.size, 1)}
                log.info("tokenizer: %s: %d documents -> %d tokens (%.2f bytes/token)", split, len(texts),
                         ids.size, n_bytes / max(ids.size, 1))
            manifest["tokenizer_digest"] = sha256_file(tmp / "tokenizer.json")
            write_json(tmp / "tokens.json", manifest)
        result = load_tokenized(out_dir)
        run.set_tags({"gptcore.tokenizer_digest": result.tokenizer_digest})
        run.log_metrics({"vocab_size": vocab_size, "val_bytes_per_token": result.bytes_per_token["val"]}
                        | {f"{s}_tokens": n for s, n in result.tokens.items()})
        run.log_artifact(result.tokenizer_path)
        run.log_artifact(out_dir / "tokens.json")
    return result


def load_tokenized(out_dir: str | Path) -> TokenizerResult:
    """The result of an earlier `train_tokenizer` into `out_dir`, from its manifest."""
    m = read_stage_output(out_dir, "tokens.json", "tokenized corpus", "tokenizer")
    return TokenizerResult(
        out_dir=str(out_dir),
        tokenizer_path=str(Path(out_dir) / "tokenizer.json"),
        vocab_size=m["vocab_size"],
        dtype=m["dtype"],
        tokens={s: v["tokens"] for s, v in m["splits"].items()},
        bytes_per_token={s: v["bytes_per_token"] for s, v in m["splits"].items()},
        tokenizer_digest=m["tokenizer_digest"],
        data_digest=m["data_digest"],
    )


def read_tokens(result: TokenizerResult, split: str) -> np.ndarray:
    """A split's token ids as a read-only memmap."""
    path = result.tokens_path(split)
    if not path.is_file():
        raise InputError(f"{path}: token file not found; run `gptcore tokenizer` first")
    return np.memmap(path, dtype=np.dtype(result.dtype), mode="r")
