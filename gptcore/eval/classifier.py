"""Evaluation of the classifier: accuracy, macro-F1, calibration and per-class figures on the test
passages, each with a 95% bootstrap interval, beside the majority-class baseline.

Output: OUT/classifier_eval.json, OUT/confusion_matrix.png, OUT/attributions.html (integrated
gradients on a fixed sample of test passages, `gptcore.eval.explain`), OUT/classifier_predictions.npz
(each test passage's probabilities: the promotion gate's evidence) and
OUT/classifier_scoring_reference.npz (each test document's probabilities as batch scoring reads
it: the drift monitor's reference).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gptcore.data.passages import make_passages
from gptcore.eval.explain import explain_sample
from gptcore.fsutil import atomic_file, write_json
from gptcore.layout import (
    ATTRIBUTIONS,
    CLASSIFIER_EVAL,
    CONFUSION_MATRIX,
    EOT,
    PAD,
    PREDICTIONS_FILE,
    SCORING_REFERENCE_FILE,
)
from gptcore.metrics import bootstrap_intervals, classification_report, majority_baseline
from gptcore.model import GPTClassifier, classify
from gptcore.results import (
    ClassifierEvalResult,
    load_finetuned,
    load_tokenizer,
    read_split,
    write_predictions,
    write_scoring_reference,
)
from gptcore.runtime.classifier import first_block
from gptcore.tracking import Tracking, stage_run
from gptcore.weights import load_classifier, pick_device

log = logging.getLogger("gptcore.evaluate")


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
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def scoring_reference_probs(model: GPTClassifier, data_dir: str | Path, tok, batch_size: int) -> np.ndarray:
    """Every test document's class probabilities as batch scoring reads it: its `first_block`, not
    the passages the report is over (the drift monitor compares a scoring run's predictions with
    these, `gptcore.registry.drift`). In torch: the export's parity check keeps the ONNX graph to
    the same figures."""
    texts = read_split(data_dir, "test", ["text"]).column("text").to_pylist()
    eot, block_size = tok.token_to_id(EOT), model.gpt.cfg.block_size
    blocks = [first_block(enc.ids, block_size, eot) for enc in tok.encode_batch(texts, add_special_tokens=False)]
    return classify(model, blocks, tok.token_to_id(PAD), batch_size)


def interval(bounds: list[float]) -> str:
    return f"[95% CI {bounds[0]:.4f}, {bounds[1]:.4f}]"


def evaluate_classifier(
    finetuned_dir: str | Path,
    data_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
    batch_size: int = 64,
) -> ClassifierEvalResult:
    """Test-split report of the fine-tuned classifier beside the majority-class baseline."""
    finetuned = load_finetuned(finetuned_dir)
    model, meta = load_classifier(finetuned.best_dir)
    model.to(pick_device("auto"))
    tok = load_tokenizer(tokenized_dir)
    labels, field, length = meta["labels"], meta["label_field"], meta["passage_tokens"]
    train, _ = make_passages(data_dir, "train", field, tok, length, labels)
    test, _ = make_passages(data_dir, "test", field, tok, length, labels)
    probs = classify(model, test.ids, tok.token_to_id(PAD), batch_size)
    report = classification_report(test.labels, probs, labels) | {"ci": bootstrap_intervals(test.labels, probs, labels)}
    out_dir = Path(out_dir)
    report["predictions"] = write_predictions(out_dir / PREDICTIONS_FILE, test.doc_ids, test.ids, test.labels, probs)
    report["scoring_reference"] = write_scoring_reference(
        out_dir / SCORING_REFERENCE_FILE, scoring_reference_probs(model, data_dir, tok, batch_size)
    )
    baseline = majority_baseline(train.labels, test.labels, labels)
    result = ClassifierEvalResult(
        str(out_dir / CLASSIFIER_EVAL), str(out_dir / CONFUSION_MATRIX), str(out_dir / ATTRIBUTIONS), report, baseline
    )
    write_json(result.metrics_path, asdict(result))
    plot_confusion(
        report,
        Path(result.confusion_path),
        f"test: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}",
    )
    explained = explain_sample(model, tok, test, labels, result.attributions_path)
    log.info(
        "evaluate: classifier test accuracy %.4f %s, macro-F1 %.4f %s, ECE %.4f over %d passages "
        "(majority '%s': %.4f / %.4f)",
        report["accuracy"],
        interval(report["ci"]["accuracy"]),
        report["macro_f1"],
        interval(report["ci"]["macro_f1"]),
        report["ece"],
        len(test),
        baseline["majority_class"],
        baseline["accuracy"],
        baseline["macro_f1"],
    )
    with stage_run(tracking, "evaluate_classifier", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        metrics = {
            "test/accuracy": report["accuracy"],
            "test/macro_f1": report["macro_f1"],
            "test/ece": report["ece"],
            "majority/test_accuracy": baseline["accuracy"],
            "majority/test_macro_f1": baseline["macro_f1"],
        }
        for name in ("accuracy", "macro_f1", "ece"):
            metrics |= dict(zip((f"test/{name}_ci_low", f"test/{name}_ci_high"), report["ci"][name]))
        for label, per in report["per_class"].items():
            metrics |= {f"per_class/{m}_{label}": per[m] for m in ("precision", "recall", "f1")}
        metrics["explain/completeness_gap_max"] = max(ex.completeness_gap for ex in explained)
        run.log_metrics(metrics)
        run.log_artifact(result.metrics_path)
        run.log_artifact(result.confusion_path)
        run.log_artifact(result.attributions_path)
        run.log_artifact(str(out_dir / PREDICTIONS_FILE))
        run.log_artifact(str(out_dir / SCORING_REFERENCE_FILE))
    return result
