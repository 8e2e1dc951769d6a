"""Evaluation of the language model: loss, perplexity and bits per byte on val and test beside a
unigram baseline, each test document's bits per byte on its own, and samples from fixed prompts.

Output: OUT/lm_eval.json, OUT/samples.txt, OUT/lm_doc_bpb.npz (each test document's figures: the
LM promotion gate's evidence).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gptcore.config import EvalConfig
from gptcore.errors import InputError
from gptcore.fsutil import atomic_file, write_json
from gptcore.layout import DOC_BPB_FILE, EOT, LM_EVAL, LM_SAMPLES
from gptcore.metrics import bits_per_byte, document_distribution, documents_digest, score_documents, unigram_nats
from gptcore.model import GPT, sequence_nll
from gptcore.results import (
    DocScores,
    LMEvalResult,
    load_ingest,
    load_pretrained,
    load_tokenized,
    load_tokenizer,
    read_split,
    read_tokens,
    token_byte_lengths,
    write_doc_scores,
)
from gptcore.tracking import Tracking, stage_run
from gptcore.weights import load_lm, pick_device

log = logging.getLogger("gptcore.evaluate")


def split_nll(model: GPT, tokens: np.ndarray, max_tokens: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL (nats) and target ids over the first `max_tokens` tokens of a split.

    Non-overlapping windows of block_size + 1 tokens, so each target is scored once with up to
    block_size tokens of context.
    """
    T = model.cfg.block_size
    n_windows = (min(len(tokens), max_tokens) - 1) // T
    if n_windows < 1:
        raise InputError(f"a split of {len(tokens)} tokens is too short to score with block_size={T}")
    windows = np.stack([tokens[i * T : i * T + T + 1] for i in range(n_windows)]).astype(np.int64)
    nll = sequence_nll(model, windows[:, :-1], windows[:, 1:], batch_size)
    return nll.reshape(-1), windows[:, 1:].reshape(-1)


def generate_samples(model: GPT, tok, cfg: EvalConfig) -> str:
    """Samples from the fixed prompts, each with its own fixed seed, as readable text."""
    device = next(model.parameters()).device
    parts = []
    for i, prompt in enumerate(cfg.prompts):
        ids = tok.encode(prompt, add_special_tokens=False).ids[-model.cfg.block_size :]
        generator = torch.Generator(device=device).manual_seed(cfg.seed + i)
        out = model.generate(
            torch.tensor([ids], device=device), cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator
        )
        text = tok.decode(out[0].tolist(), skip_special_tokens=False)
        parts.append(
            f"--- prompt {i}: {prompt!r} (seed {cfg.seed + i}, temperature {cfg.temperature}, top_k {cfg.top_k})\n"
            f"{text}\n"
        )
    return "\n".join(parts)


def take_documents(tokens, eot_id: int, max_targets: int, chunk: int = 1 << 20) -> list[np.ndarray]:
    """The first documents of a token stream (documents each followed by <|endoftext|>), whole,
    while their targets total at most `max_targets`; read `chunk` tokens at a time, never all.

    A first document longer than the cap is cut to fit, so there is always one to score.
    """
    docs, total, start, n = [], 0, 0, len(tokens)
    for pos in range(0, n, chunk):
        block = np.asarray(tokens[pos : min(pos + chunk, n)])
        for end in (np.flatnonzero(block == eot_id) + pos).tolist():
            if end > start:  # an empty document has no bytes to score
                if total + end - start + 1 > max_targets:
                    if not docs:
                        log.warning(
                            "evaluate: the first document (%d tokens) passes the cap of %d tokens; scoring "
                            "its first %d",
                            end - start,
                            max_targets,
                            max_targets - 1,
                        )
                        docs.append(np.asarray(tokens[start : start + max(1, max_targets - 1)], dtype=np.int64))
                    return docs
                docs.append(np.asarray(tokens[start:end], dtype=np.int64))
                total += end - start + 1
            start = end + 1
    if not docs:
        raise InputError(f"no document to score: {n} tokens hold no <|endoftext|>-terminated document")
    return docs


def document_ids(data_dir: str | Path | None, tokens, n: int) -> list[str]:
    """Ids of the test split's first n documents: from the ingested split the shards were encoded
    from (documents sit in the shards in its row order), else their positions in the split."""
    if data_dir is None:
        return [f"test/{i}" for i in range(n)]
    digest = load_ingest(data_dir).digest
    if digest != tokens.data_digest:
        raise InputError(
            f"{data_dir}: holds other data ({digest[:12]}) than the tokens were encoded from "
            f"({tokens.data_digest[:12]}); run `gptcore tokenizer` again"
        )
    return [str(i) for i in read_split(data_dir, "test", ["id"]).column("id").slice(0, n).to_pylist()]


def score_test_documents(
    model: GPT, tok, tokens, data_dir: str | Path | None, max_tokens: int
) -> tuple[DocScores, str]:
    """Each of the test split's first documents (up to `max_tokens` targets) scored on its own,
    and a digest of the documents: the promotion gate pairs two versions' scores when it agrees."""
    eot = tok.token_to_id(EOT)
    docs = take_documents(read_tokens(tokens, "test"), eot, max_tokens)
    ids = document_ids(data_dir, tokens, len(docs))
    nats = score_documents(
        docs, eot, model.cfg.block_size, model.cfg.vocab_size, lambda x, y: sequence_nll(model, x, y, batch_size=len(x))
    )
    byte_lengths = token_byte_lengths(tok)
    scores = DocScores(
        np.asarray(ids, dtype=str),
        nats,
        np.array([len(d) + 1 for d in docs], dtype=np.int64),
        np.array([int(byte_lengths[d].sum()) for d in docs], dtype=np.int64),
    )
    return scores, documents_digest(ids, tok.decode_batch([d.tolist() for d in docs], skip_special_tokens=False))


def evaluate_lm(
    cfg: EvalConfig,
    pretrained_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
    data_dir: str | Path | None = None,
) -> LMEvalResult:
    """Val/test loss, perplexity and bits per byte of the pretrained GPT, a unigram baseline's bpb,
    the test documents' bits per byte one by one (ids from the ingested `data_dir` when given), samples."""
    pretrained = load_pretrained(pretrained_dir)
    model, _ = load_lm(pretrained.best_dir)
    model.to(pick_device("auto"))
    tokens = load_tokenized(tokenized_dir)
    tok = load_tokenizer(tokenized_dir)
    byte_lengths = token_byte_lengths(tok)
    train_counts = read_tokens(tokens, "train").bincount(tokens.vocab_size)
    out_dir = Path(out_dir)
    scores, unigram = {}, {}
    for split in ("val", "test"):
        nats, targets = split_nll(model, read_tokens(tokens, split), cfg.max_eval_tokens)
        n_bytes = int(byte_lengths[targets].sum())
        loss = float(nats.mean())
        scores[split] = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bpb": bits_per_byte(float(nats.sum()), n_bytes),
            "tokens": int(targets.size),
            "bytes": n_bytes,
        }
        unigram[split] = bits_per_byte(unigram_nats(train_counts, targets), n_bytes)
        log.info(
            "evaluate: %s loss %.4f | ppl %.2f | %.4f bits/byte (unigram baseline %.4f) over %d tokens",
            split,
            loss,
            math.exp(loss),
            scores[split]["bpb"],
            unigram[split],
            targets.size,
        )
    documents, digest = score_test_documents(model, tok, tokens, data_dir, cfg.max_eval_tokens)
    write_doc_scores(out_dir / DOC_BPB_FILE, documents)
    summary = scores["test"]["documents"] = document_distribution(documents) | {
        "file": DOC_BPB_FILE,
        "examples_digest": digest,
    }
    log.info(
        "evaluate: test documents one by one: median %.4f bits/byte (p10 %.4f, p90 %.4f) over %d documents",
        summary["median"],
        summary["p10"],
        summary["p90"],
        summary["documents"],
    )
    samples = generate_samples(model, tok, cfg)
    result = LMEvalResult(str(out_dir / LM_EVAL), str(out_dir / LM_SAMPLES), scores["val"], scores["test"], unigram)
    write_json(result.metrics_path, asdict(result))
    with atomic_file(result.samples_path) as tmp:
        tmp.write_text(samples, encoding="utf-8")
    tags = {"gptcore.data_digest": pretrained.data_digest, "gptcore.tokenizer_digest": pretrained.tokenizer_digest}
    with stage_run(tracking, "evaluate_lm", tags=tags) as run:
        run.log_params({"eval": asdict(cfg)})
        run.log_metrics(
            {f"{s}/{k}": v for s in ("val", "test") for k, v in scores[s].items() if k != "documents"}
            | {f"unigram/{s}_bpb": v for s, v in unigram.items()}
            | {f"test/doc_bpb_{k}": summary[k] for k in ("mean", "median", "p10", "p90")}
            | {"test/documents": summary["documents"]}
        )
        run.log_artifact(result.metrics_path)
        run.log_artifact(result.samples_path)
        run.log_artifact(str(out_dir / DOC_BPB_FILE))
    return result
