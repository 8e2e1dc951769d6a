"""Evaluation: the language model (loss, perplexity, bits per byte, per-document bits per byte,
samples) and the classifier (accuracy, macro-F1, per-class precision/recall, confusion matrix),
each beside a baseline.

Output: OUT/lm_eval.json + OUT/samples.txt + OUT/lm_doc_bpb.npz (each test document's figures), and
OUT/classifier_eval.json + OUT/confusion_matrix.png + OUT/attributions.html (integrated gradients
on a fixed sample of test passages, `gptcore.explain`) + OUT/classifier_predictions.npz (each test
passage's probabilities: the promotion gate's evidence) + OUT/classifier_scoring_reference.npz
(each test document's probabilities as batch scoring reads it: the drift monitor's reference).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gptcore.checkpoint import load_classifier, load_lm
from gptcore.config import EvalConfig
from gptcore.data.ingest import load_ingest, read_split
from gptcore.doc_bpb import DocScores, distribution, documents_digest, save_doc_scores, score_documents, take_documents
from gptcore.errors import InputError
from gptcore.explain import explain_sample
from gptcore.finetune import load_finetuned, make_passages, predict
from gptcore.fsutil import atomic_file, read_stage_output, write_json
from gptcore.metrics import bits_per_byte, bootstrap_intervals, classification_report, majority_baseline, unigram_nats
from gptcore.model import GPT, GPTClassifier
from gptcore.pretrain import load_pretrained
from gptcore.runtime.classifier import first_block
from gptcore.data.shards import token_byte_lengths
from gptcore.tokenizer import EOT, PAD, load_tokenized, load_tokenizer, read_tokens
from gptcore.tracking import Tracking, stage_run
from gptcore.train import pick_device

log = logging.getLogger("gptcore.evaluate")


@torch.no_grad()
def token_nats(model: GPT, tokens: np.ndarray, max_tokens: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL (nats) and target ids over the first `max_tokens` tokens of a split.

    Non-overlapping windows of block_size + 1 tokens, so each target is scored once with up to
    block_size tokens of context.
    """
    T = model.cfg.block_size
    n_windows = (min(len(tokens), max_tokens) - 1) // T
    if n_windows < 1:
        raise InputError(f"a split of {len(tokens)} tokens is too short to score with block_size={T}")
    windows = np.stack([tokens[i * T : i * T + T + 1] for i in range(n_windows)]).astype(np.int64)
    device = next(model.parameters()).device
    nats = []
    for i in range(0, n_windows, batch_size):
        w = torch.from_numpy(windows[i : i + batch_size]).to(device)
        logits, _ = model(w[:, :-1])
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="none")
        nats.append(nll.cpu().numpy())
    return np.concatenate(nats).astype(np.float64), windows[:, 1:].reshape(-1)


def generate_samples(model: GPT, tok, cfg: EvalConfig) -> str:
    """Samples from the fixed prompts, each with its own fixed seed, as readable text."""
    device = next(model.parameters()).device
    parts = []
    for i, prompt in enumerate(cfg.prompts):
        ids = tok.encode(prompt, add_special_tokens=False).ids[-model.cfg.block_size :]
        generator = torch.Generator(device=device).manual_seed(cfg.seed + i)
        out = model.generate(torch.tensor([ids], device=device), cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator)
        text = tok.decode(out[0].tolist(), skip_special_tokens=False)
        parts.append(f"--- prompt {i}: {prompt!r} (seed {cfg.seed + i}, temperature {cfg.temperature}, top_k {cfg.top_k})\n{text}\n")
    return "\n".join(parts)


DOC_BPB_FILE = "lm_doc_bpb.npz"


@torch.no_grad()
def gpt_nats(model: GPT, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(B, T) ids and targets (-1: not scored) -> (B, T) NLL in nats, 0 where not scored.

    Over the tokenizer's ids only, not the embedding's padding, as the exported ONNX graph.
    """
    V = model.cfg.vocab_size
    logits, _ = model(torch.from_numpy(inputs).to(next(model.parameters()).device))
    t = torch.from_numpy(targets).to(logits.device)
    nll = F.cross_entropy(logits[..., :V].float().reshape(-1, V), t.reshape(-1), ignore_index=-1, reduction="none")
    return nll.view(t.shape).cpu().numpy()


def document_ids(data_dir: str | Path | None, tokens, n: int) -> list[str]:
    """Ids of the test split's first n documents: from the ingested split the shards were encoded
    from (documents sit in the shards in its row order), else their positions in the split."""
    if data_dir is None:
        return [f"test/{i}" for i in range(n)]
    digest = load_ingest(data_dir).digest
    if digest != tokens.data_digest:
        raise InputError(f"{data_dir}: holds other data ({digest[:12]}) than the tokens were encoded from "
                         f"({tokens.data_digest[:12]}); run `gptcore tokenizer` again")
    return [str(i) for i in read_split(data_dir, "test", ["id"]).column("id").slice(0, n).to_pylist()]


def score_test_documents(model: GPT, tok, tokens, data_dir: str | Path | None,
                         max_tokens: int) -> tuple[DocScores, str]:
    """Each of the test split's first documents (up to `max_tokens` targets) scored on its own,
    and a digest of the documents: the promotion gate pairs two versions' scores when it agrees."""
    eot = tok.token_to_id(EOT)
    docs = take_documents(read_tokens(tokens, "test"), eot, max_tokens)
    ids = document_ids(data_dir, tokens, len(docs))
    nats = score_documents(docs, eot, model.cfg.block_size, model.cfg.vocab_size, lambda x, y: gpt_nats(model, x, y))
    byte_lengths = token_byte_lengths(tok)
    scores = DocScores(np.asarray(ids, dtype=str), nats, np.array([len(d) + 1 for d in docs], dtype=np.int64),
                       np.array([int(byte_lengths[d].sum()) for d in docs], dtype=np.int64))
    return scores, documents_digest(ids, tok.decode_batch([d.tolist() for d in docs], skip_special_tokens=False))


@dataclass
class LMEvalResult:
    metrics_path: str
    samples_path: str
    val: dict[str, float]
    test: dict  # as val, plus "documents": the per-document bits per byte summarised
    unigram_bpb: dict[str, float]


def evaluate_lm(
    cfg: EvalConfig, pretrained_dir: str | Path, tokenized_dir: str | Path, out_dir: str | Path,
    tracking: Tracking | None = None, data_dir: str | Path | None = None,
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
        nats, targets = token_nats(model, read_tokens(tokens, split), cfg.max_eval_tokens)
        n_bytes = int(byte_lengths[targets].sum())
        loss = float(nats.mean())
        scores[split] = {"loss": loss, "perplexity": math.exp(loss), "bpb": bits_per_byte(float(nats.sum()), n_bytes),
                         "tokens": int(targets.size), "bytes": n_bytes}
        unigram[split] = bits_per_byte(unigram_nats(train_counts, targets), n_bytes)
        log.info("evaluate: %s loss %.4f | ppl %.2f | %.4f bits/byte (unigram baseline %.4f) over %d tokens", split,
                 loss, math.exp(loss), scores[split]["bpb"], unigram[split], targets.size)
    documents, digest = score_test_documents(model, tok, tokens, data_dir, cfg.max_eval_tokens)
    save_doc_scores(out_dir / DOC_BPB_FILE, documents)
    summary = scores["test"]["documents"] = distribution(documents) | {"file": DOC_BPB_FILE, "examples_digest": digest}
    log.info("evaluate: test documents one by one: median %.4f bits/byte (p10 %.4f, p90 %.4f) over %d documents",
             summary["median"], summary["p10"], summary["p90"], summary["documents"])
    samples = generate_samples(model, tok, cfg)
    result = LMEvalResult(str(out_dir / "lm_eval.json"), str(out_dir / "samples.txt"), scores["val"], scores["test"], unigram)
    write_json(result.metrics_path, asdict(result))
    with atomic_file(result.samples_path) as tmp:
        tmp.write_text(samples, encoding="utf-8")
    tags = {"gptcore.data_digest": pretrained.data_digest, "gptcore.tokenizer_digest": pretrained.tokenizer_digest}
    with stage_run(tracking, "evaluate_lm", tags=tags) as run:
        run.log_params({"eval": asdict(cfg)})
        run.log_metrics({f"{s}_{k}": v for s in ("val", "test") for k, v in scores[s].items() if k != "documents"}
                        | {f"unigram_{s}_bpb": v for s, v in unigram.items()}
                        | {f"test_doc_bpb_{k}": summary[k] for k in ("mean", "median", "p10", "p90")}
                        | {"test_documents": summary["documents"]})
        run.log_artifact(result.metrics_path)
        run.log_artifact(result.samples_path)
        run.log_artifact(str(out_dir / DOC_BPB_FILE))
    return result


def plot_confusion(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or on a worker
    import matplotlib.pyplot as plt

    cm, labels = np.asarray(report["confusion_matrix"]), report["labels"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


PREDICTIONS_FILE = "classifier_predictions.npz"


def save_predictions(path: Path, examples, probs: np.ndarray) -> dict:
    """Every test example's label and class probabilities (npz, read back without pickle), and
    a digest of the examples (document ids, token ids, labels): the promotion gate pairs two
    versions' predictions only when their digests agree."""
    h = hashlib.sha256()
    for doc_id, ids, label in zip(examples.doc_ids, examples.ids, examples.labels):
        h.update(f"{doc_id}\0{label}\0".encode() + np.asarray(ids, dtype=np.int64).tobytes())
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, labels=np.asarray(examples.labels, dtype=np.int64), probs=np.asarray(probs, dtype=np.float64))
    return {"file": path.name, "examples": len(examples.labels), "examples_digest": h.hexdigest()}


SCORING_REFERENCE_FILE = "classifier_scoring_reference.npz"


def save_scoring_reference(path: Path, model: GPTClassifier, data_dir: str | Path, tok, batch_size: int) -> dict:
    """Every test document's class probabilities as batch scoring reads it: its `first_block`, not
    the passages the report is over (the drift monitor compares a scoring run's predictions with
    these, `gptcore.monitoring`). In torch: the export's parity check keeps the ONNX graph to the
    same figures. npz, read back without pickle."""
    texts = read_split(data_dir, "test", ["text"]).column("text").to_pylist()
    eot, block_size = tok.token_to_id(EOT), model.gpt.cfg.block_size
    blocks = [first_block(enc.ids, block_size, eot) for enc in tok.encode_batch(texts, add_special_tokens=False)]
    probs = predict(model, blocks, tok.token_to_id(PAD), batch_size)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probs=probs.astype(np.float64))
    return {"file": path.name, "documents": len(blocks)}


def interval(bounds: list[float]) -> str:
    return f"[95% CI {bounds[0]:.4f}, {bounds[1]:.4f}]"


@dataclass
class ClassifierEvalResult:
    metrics_path: str
    confusion_path: str
    attributions_path: str
    test: dict
    majority: dict


def evaluate_classifier(
    finetuned_dir: str | Path, data_dir: str | Path, tokenized_dir: str | Path, out_dir: str | Path,
    tracking: Tracking | None = None, batch_size: int = 64,
) -> ClassifierEvalResult:
    """Test-split report of the fine-tuned classifier beside the majority-class baseline."""
    finetuned = load_finetuned(finetuned_dir)
    model, meta = load_classifier(finetuned.best_dir)
    model.to(pick_device("auto"))
    tok = load_tokenizer(tokenized_dir)
    labels, field, length = meta["labels"], meta["label_field"], meta["passage_tokens"]
    train, _ = make_passages(data_dir, "train", field, tok, length, labels)
    test, _ = make_passages(data_dir, "test", field, tok, length, labels)
    probs = predict(model, test.ids, tok.token_to_id(PAD), batch_size)
    report = classification_report(test.labels, probs, labels) | {"ci": bootstrap_intervals(test.labels, probs, labels)}
    out_dir = Path(out_dir)
    report["predictions"] = save_predictions(out_dir / PREDICTIONS_FILE, test, probs)
    report["scoring_reference"] = save_scoring_reference(out_dir / SCORING_REFERENCE_FILE, model, data_dir, tok,
                                                         batch_size)
    baseline = majority_baseline(train.labels, test.labels, labels)
    result = ClassifierEvalResult(str(out_dir / "classifier_eval.json"), str(out_dir / "confusion_matrix.png"),
                                  str(out_dir / "attributions.html"), report, baseline)
    write_json(result.metrics_path, asdict(result))
    plot_confusion(report, Path(result.confusion_path), f"test: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    explained = explain_sample(model, tok, test, labels, result.attributions_path)
    log.info("evaluate: classifier test accuracy %.4f %s, macro-F1 %.4f %s, ECE %.4f over %d passages "
             "(majority '%s': %.4f / %.4f)", report["accuracy"], interval(report["ci"]["accuracy"]), report["macro_f1"],
             interval(report["ci"]["macro_f1"]), report["ece"], len(test), baseline["majority_class"],
             baseline["accuracy"], baseline["macro_f1"])
    with stage_run(tracking, "evaluate_classifier", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        metrics = {"test_accuracy": report["accuracy"], "test_macro_f1": report["macro_f1"], "test_ece": report["ece"],
                   "majority_test_accuracy": baseline["accuracy"], "majority_test_macro_f1": baseline["macro_f1"]}
        for name in ("accuracy", "macro_f1", "ece"):
            metrics |= dict(zip((f"test_{name}_ci_low", f"test_{name}_ci_high"), report["ci"][name]))
        for label, per in report["per_class"].items():
            metrics |= {f"test_{m}_{label}": per[m] for m in ("precision", "recall", "f1")}
        metrics["attribution_completeness_gap_max"] = max(ex.completeness_gap for ex in explained)
        run.log_metrics(metrics)
        run.log_artifact(result.metrics_path)
        run.log_artifact(result.confusion_path)
        run.log_artifact(result.attributions_path)
        run.log_artifact(str(out_dir / PREDICTIONS_FILE))
        run.log_artifact(str(out_dir / SCORING_REFERENCE_FILE))
    return result


def read_eval(path: str | Path) -> dict:
    path = Path(path)
    return read_stage_output(path.parent, path.name, "evaluation", "evaluate")
