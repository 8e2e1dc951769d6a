"""What each stage returns, and the one way to read it back from the directory the stage wrote.

A stage returns a record (a dataclass of paths, counts, digests and figures) and leaves the
files `gptcore.layout` names. A stage that needs another's output reads it here, never by
importing the stage that wrote it, so a stage's code (its stage-cache key) covers only what it
runs. A missing output is an `InputError` naming the verb that makes it. Files with arrays are
npz of plain arrays, read without pickle. Torch-free: the registry and the runtime read these too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptcore.errors import ConfigError, InputError
from gptcore.fsutil import atomic_file, read_json
from gptcore.layout import INGEST_MANIFEST, PACKAGE_META, RESULT_FILE, SPLITS, TOKENIZER_FILE, TOKENS_MANIFEST


def read_stage_output(out_dir: str | Path, name: str, what: str, verb: str) -> Any:
    """The JSON a stage left in `out_dir`, or an error saying which verb produces it."""
    path = Path(out_dir) / name
    if not path.is_file():
        raise InputError(f"{out_dir}: no {what} here (missing {name}); run `gptcore {verb}` first")
    return read_json(path)


# --- ingest --------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    out_dir: str
    manifest_path: str
    digest: str
    documents: dict[str, int]
    bytes: dict[str, int]
    sources: list[dict[str, Any]]

    def split_path(self, split: str) -> Path:
        return Path(self.out_dir) / f"{split}.parquet"


def load_ingest(out_dir: str | Path) -> IngestResult:
    """The result of an earlier `ingest` into `out_dir`, from its manifest."""
    m = read_stage_output(out_dir, INGEST_MANIFEST, "ingested corpus", "ingest")
    return IngestResult(
        str(out_dir),
        str(Path(out_dir) / INGEST_MANIFEST),
        m["digest"],
        {s: m["splits"][s]["documents"] for s in SPLITS},
        {s: m["splits"][s]["bytes"] for s in SPLITS},
        m["sources"],
    )


def read_split(out_dir: str | Path, split: str, columns: list[str] | None = None):
    """One split as a pyarrow Table (no Hugging Face cache copy)."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / f"{split}.parquet"
    if not path.is_file():
        raise InputError(f"{path}: split {split!r} not found; run `gptcore ingest` first")
    if columns:
        available = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns if c not in available]
        if missing:
            raise InputError(f"{path}: no column(s) {missing} (columns: {available})")
    return pq.read_table(path, columns=columns)


# --- tokenizer -----------------------------------------------------------------------------------


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
    shards: dict[str, list[str]]
    digest: str

    def shard_paths(self, split: str) -> list[Path]:
        return [Path(self.out_dir) / name for name in self.shards[split]]


def load_tokenized(out_dir: str | Path) -> TokenizerResult:
    """The result of an earlier `train_tokenizer` into `out_dir`, from its manifest."""
    m = read_stage_output(out_dir, TOKENS_MANIFEST, "tokenized corpus", "tokenizer")
    return TokenizerResult(
        out_dir=str(out_dir),
        tokenizer_path=str(Path(out_dir) / TOKENIZER_FILE),
        vocab_size=m["vocab_size"],
        dtype=m["dtype"],
        tokens={s: v["tokens"] for s, v in m["splits"].items()},
        bytes_per_token={s: v["bytes_per_token"] for s, v in m["splits"].items()},
        tokenizer_digest=m["tokenizer_digest"],
        data_digest=m["data_digest"],
        shards={s: [sh["file"] for sh in v["shards"]] for s, v in m["splits"].items()},
        digest=m["digest"],
    )


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from tokenizer.json, or from the directory holding it."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{path}: tokenizer not found; run `gptcore tokenizer` first")
    return Tokenizer.from_file(str(path))


def token_byte_lengths(tok) -> np.ndarray:
    """Bytes each token id stands for (0 for special tokens): the basis of bits per byte.

    In a byte-level vocabulary each character of a token's string stands for exactly one byte.
    """
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if token in specials else len(token)
    return lengths


class TokenShards:
    """A split's shards as one read-only sequence of token ids: `len()` and slices across shards."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.maps = [np.memmap(p, dtype=dtype, mode="r") for p in paths if p.stat().st_size > 0]
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TokenShards supports contiguous slices only")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            m = self.maps[first]
            offset = start - int(self.starts[first])
            take = min(stop - start, len(m) - offset)
            parts.append(m[offset : offset + take])
            start += take
            first += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : len(self)]
        return np.asarray(whole, dtype=dtype) if dtype is not None else np.asarray(whole)

    def bincount(self, minlength: int) -> np.ndarray:
        """Occurrences of each id, a shard at a time (bounded memory)."""
        counts = np.zeros(minlength, dtype=np.int64)
        for m in self.maps:
            for i in range(0, len(m), 1 << 24):
                counts += np.bincount(m[i : i + (1 << 24)], minlength=minlength)[:minlength]
        return counts


def read_tokens(result: TokenizerResult, split: str) -> TokenShards:
    """A split's token ids, read from its shards through memory maps."""
    paths = result.shard_paths(split)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: token shard not found; run `gptcore tokenizer` again")
    return TokenShards(paths, np.dtype(result.dtype))


# --- training stages: pretrain, finetune, sft ----------------------------------------------------


@dataclass
class PretrainResult:
    out_dir: str
    best_dir: str
    model: dict[str, Any]
    num_params: int
    steps: int
    best_val_loss: float
    tokens_seen: int
    train_seconds: float
    data_digest: str
    tokenizer_digest: str


@dataclass
class FinetuneResult:
    out_dir: str
    best_dir: str
    labels: list[str]
    steps: int
    stopped_early: bool
    best_val_macro_f1: float
    best_val_accuracy: float
    train_passages: int
    val_passages: int
    train_seconds: float


@dataclass
class SFTResult:
    out_dir: str
    best_dir: str
    tokenizer_path: str
    steps: int
    stopped_early: bool
    best_val_response_loss: float
    train_conversations: int
    val_conversations: int
    train_rows: int
    truncated: int
    train_seconds: float


def load_pretrained(out_dir: str | Path) -> PretrainResult:
    return PretrainResult(**read_stage_output(out_dir, RESULT_FILE, "pretrained model", "pretrain"))


def load_finetuned(out_dir: str | Path) -> FinetuneResult:
    return FinetuneResult(**read_stage_output(out_dir, RESULT_FILE, "fine-tuned model", "finetune"))


def load_sft(out_dir: str | Path) -> SFTResult:
    return SFTResult(**read_stage_output(out_dir, RESULT_FILE, "chat model", "sft"))


@dataclass
class Student:
    """One compressed student: a pretrain-shaped directory (`load_pretrained` reads it)."""

    name: str  # p<percent>-<recipe>, e.g. p50-distilled
    recipe: str  # prune+distill, prune (as cut, no recovery) or scratch (same shape, no teacher)
    target_fraction: float
    param_fraction: float  # its parameters over the teacher's
    num_params: int
    out_dir: str
    best_val_loss: float
    steps: int


@dataclass
class CompressResult:
    out_dir: str
    teacher_params: int
    students: list[Student]

    def by_recipe(self, recipe: str) -> list[Student]:
        return [s for s in self.students if s.recipe == recipe]

    def named(self, name: str) -> Student:
        """The student called `name`: a name from the user is checked against those written."""
        for student in self.students:
            if student.name == name:
                return student
        names = ", ".join(s.name for s in self.students)
        raise ConfigError(f"--student {name!r}: the compress stage in {self.out_dir} made {names}")


def load_compressed(out_dir: str | Path) -> CompressResult:
    raw = read_stage_output(out_dir, RESULT_FILE, "compressed students", "compress")
    return CompressResult(raw["out_dir"], raw["teacher_params"], [Student(**s) for s in raw["students"]])


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class LMEvalResult:
    metrics_path: str
    samples_path: str
    val: dict[str, float]
    test: dict  # as val, plus "documents": the per-document bits per byte summarised
    unigram_bpb: dict[str, float]


@dataclass
class ClassifierEvalResult:
    metrics_path: str
    confusion_path: str
    attributions_path: str
    test: dict
    majority: dict


@dataclass
class SFTEvalResult:
    metrics_path: str
    samples_path: str
    conversations: int
    base: dict[str, float]
    tuned: dict[str, float]
    bpb_gain: float
    bpb_gain_ci: list[float]
    test: dict  # the tuned model's response figures, and "documents": its per-conversation bits per byte
    history: dict | None  # last answers of multi-turn conversations: with the history vs the last user turn only


def read_eval(path: str | Path) -> dict:
    """An evaluation's JSON (lm_eval.json, classifier_eval.json, sft_eval.json)."""
    path = Path(path)
    return read_stage_output(path.parent, path.name, "evaluation", "evaluate")


@dataclass
class DocScores:
    """Each document of a split scored on its own (`gptcore.metrics.score_documents`)."""

    doc_ids: np.ndarray  # (N,) str
    nats: np.ndarray  # (N,) float64: summed NLL of each document's targets
    tokens: np.ndarray  # (N,) int64: targets scored (the document's tokens + its closing <|endoftext|>)
    bytes: np.ndarray  # (N,) int64: UTF-8 bytes of the document

    @property
    def bpb(self) -> np.ndarray:
        return self.nats / math.log(2) / self.bytes


def _write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _read_npz(path: str | Path, *names: str) -> tuple[np.ndarray, ...]:
    with np.load(path, allow_pickle=False) as f:
        return tuple(f[name] for name in names)


def write_doc_scores(path: str | Path, scores: DocScores) -> None:
    """npz with plain arrays only (document ids as fixed-width unicode): it reads back without pickle."""
    _write_npz(
        path, doc_ids=np.asarray(scores.doc_ids, dtype=str), nats=scores.nats, tokens=scores.tokens, bytes=scores.bytes
    )


def read_doc_scores(path: str | Path) -> DocScores:
    return DocScores(*_read_npz(path, "doc_ids", "nats", "tokens", "bytes"))


def write_predictions(
    path: Path, doc_ids: Sequence[str], token_ids: Sequence[Sequence[int]], labels: np.ndarray, probs: np.ndarray
) -> dict:
    """Every test example's label and class probabilities, and a digest of the examples (document
    ids, token ids, labels): the promotion gate pairs two versions' predictions only when their
    digests agree. Returns what the evaluation records about the file."""
    h = hashlib.sha256()
    for doc_id, ids, label in zip(doc_ids, token_ids, labels):
        h.update(f"{doc_id}\0{label}\0".encode() + np.asarray(ids, dtype=np.int64).tobytes())
    _write_npz(path, labels=np.asarray(labels, dtype=np.int64), probs=np.asarray(probs, dtype=np.float64))
    return {"file": path.name, "examples": len(labels), "examples_digest": h.hexdigest()}


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probs (N, K)) of the test examples."""
    labels, probs = _read_npz(path, "labels", "probs")
    return labels, probs


def write_scoring_reference(path: Path, probs: np.ndarray) -> dict:
    """Every test document's class probabilities as batch scoring reads it (the drift reference)."""
    _write_npz(path, probs=np.asarray(probs, dtype=np.float64))
    return {"file": path.name, "documents": len(probs)}


def read_scoring_reference(path: str | Path) -> np.ndarray:
    """(N, K) probabilities of the test documents as the evaluation stage wrote them."""
    return _read_npz(path, "probs")[0]


# --- export --------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    package_dir: str
    kind: str
    onnx_bytes: int
    parity: dict


def load_export(package_dir: str | Path) -> dict:
    """A model package's description (gptcore_model.json) as the export stage wrote it."""
    return read_stage_output(package_dir, PACKAGE_META, "model package", "export")
