"""Model versions evaluated side by side on one data file, through ONNX Runtime (no torch).

    gptcore evaluate --model models:/gptcore-classifier@champion \\
                     --model models:/gptcore-classifier@challenger --data test.parquet

Every version, registered (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or a package
directory, scores the same rows in the same run, so each comparison with the first version is
paired, through the promotion gates' own tests (`gptcore.registry.gates`): a classifier on every
row's predicted class (macro-F1 gain, accuracy and calibration guards), a language model on
every row's bits per byte, each row a document scored as the evaluation stage scores test
documents (`gptcore.metrics.score_documents`). Bits per byte does not depend on the tokenizer,
so language models with different tokenizers compare too. A classifier reads each row's first
block_size tokens, as `gptcore score` does. `gptcore.registry.promotion.promote_version` acts on
such a comparison.
"""

from __future__ import annotations

import logging
from numbers import Integral
from pathlib import Path

import numpy as np

from gptcore.config import RegistryConfig
from gptcore.errors import InputError
from gptcore.fsutil import write_json
from gptcore.metrics import (
    bootstrap_intervals,
    classification_report,
    document_distribution,
    documents_digest,
    score_documents,
    token_nll,
)
from gptcore.registry.gates import GateDecision, compare_classifiers, compare_lms
from gptcore.results import DocScores
from gptcore.runtime import OnnxClassifier, OnnxLM, load_model
from gptcore.runtime.tables import read_table
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.evaluate")


def class_indices(values: list, labels: list[str], where: str, field: str, uri: str) -> np.ndarray:
    """Each row's label as an index into the model's class names.

    A label is a class name, or an integer: the class of that name where every class name is an
    integer ("1", "2": a CSV reads such labels as numbers), else the class at that index.
    """
    by_name = {name: k for k, name in enumerate(labels)}
    numeric_names = all(name.lstrip("-").isdigit() for name in labels)
    out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        if value is None:
            raise InputError(f"{where}: row {row} (counting from 0): column {field!r} is null")
        if isinstance(value, Integral) and not isinstance(value, bool):
            k = by_name.get(str(value), -1) if numeric_names else int(value)
            if not 0 <= k < len(labels):
                raise InputError(
                    f"{where}: row {row} (counting from 0): label {value} is not a class of {uri} "
                    f"(classes by index: {dict(enumerate(labels))})"
                )
        elif isinstance(value, str):
            if value not in by_name:
                raise InputError(
                    f"{where}: row {row} (counting from 0): label {value!r} is not a class of {uri} "
                    f"(classes: {', '.join(labels)})"
                )
            k = by_name[value]
        else:
            raise InputError(
                f"{where}: row {row} (counting from 0): label {value!r} is neither a class name nor a class index"
            )
        out[row] = k
    return out


def lm_scores(model: OnnxLM, texts: list[str]) -> DocScores:
    """Every text's bits per byte as a document of its own."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(model.tokenizer.to_str())  # a copy: generation keeps reading special tokens
    tok.encode_special_tokens = True  # a literal <|endoftext|> in a text is text, as in the token shards
    docs = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]
    nats = score_documents(
        docs, model.eos_id, model.block_size, model.vocab_size, lambda x, y: token_nll(model.forward_logits(x), y)
    )
    return DocScores(
        np.asarray([str(i) for i in range(len(texts))]),
        nats,
        np.array([len(d) + 1 for d in docs], dtype=np.int64),
        np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
    )


def verdict(ci: list[float]) -> str:
    """The candidate against the baseline, by the 95% interval of its gain."""
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no significant difference"


def evaluate_versions(
    uris: list[str],
    data: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    output: str | Path | None = None,
    tracking: Tracking | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    gate: RegistryConfig | None = None,
    device: str = "auto",
    batch_size: int = 32,
) -> dict:
    """Evaluate each version on the rows of `data` (.parquet, .jsonl or .csv) and compare each with the first.

    Classifiers need `label_field` (class names or integers, see `class_indices`); language
    models read `text_field` only. `tracking_uri`/`registry_uri` say where `models:/` URIs
    resolve; `tracking` (None: log nothing) where the report is logged. Returns the report,
    also written to `output` as JSON when given.
    """
    if not uris:
        raise InputError("evaluate: name at least one model version (--model URI)")
    gate = gate or RegistryConfig()
    models = [load_model(uri, device=device, tracking_uri=tracking_uri, registry_uri=registry_uri) for uri in uris]
    kind = models[0].package.kind
    for uri, model in zip(uris[1:], models[1:]):
        if model.package.kind != kind:
            raise InputError(
                f"{uri}: is a {model.package.kind}, but {uris[0]} is a {kind}: only versions of one kind compare"
            )
    table = read_table(data, text_field)
    texts = table.column(text_field).to_pylist()
    if not texts:
        raise InputError(f"{data}: no rows to evaluate")
    report = {
        "data": str(data),
        "rows": len(texts),
        "kind": kind,
        "text_field": text_field,
        "data_digest": documents_digest([str(i) for i in range(len(texts))], texts),
        "versions": [],
        "comparisons": [],
    }
    if kind == "classifier":
        if label_field not in table.column_names:
            raise InputError(
                f"{data}: no label column {label_field!r} (columns: {', '.join(table.column_names)}); "
                "a classifier is evaluated against labels (--label-field)"
            )
        report["label_field"] = label_field
        versions, decisions = classifier_versions(
            uris, models, texts, table.column(label_field).to_pylist(), f"{data}", label_field, gate, batch_size
        )
        main = "macro_f1"
    else:
        empty = next((row for row, text in enumerate(texts) if not text), None)
        if empty is not None:
            raise InputError(
                f"{data}: row {empty} (counting from 0): column {text_field!r} is empty; a document "
                "needs at least one byte for bits per byte"
            )
        scores = [lm_scores(model, texts) for model in models]
        versions = [document_distribution(s) for s in scores]
        decisions = [compare_lms(scores[0], s, gate) for s in scores[1:]]
        main = "reduction"
    for uri, model, figures in zip(uris, models, versions):
        meta = model.package.meta
        report["versions"].append(
            {
                "uri": uri,
                "provider": model.provider,
                "data_digest": meta.get("data_digest"),
                "tokenizer_digest": meta.get("tokenizer_digest"),
                **figures,
            }
        )
    for uri, decision in zip(uris[1:], decisions):
        ci = decision.figures[main]["ci"] if decision.figures else None
        report["comparisons"].append(
            {
                "baseline": uris[0],
                "candidate": uri,
                "verdict": verdict(ci) if ci else "not comparable",
                "promote": decision.promote,
                "reason": decision.reason,
                "figures": decision.figures,
            }
        )
        log.info("evaluate: %s against %s: %s", uri, uris[0], decision.reason)
    if output is not None:
        write_json(output, report)
    log_report(tracking, report, main)
    return report


def classifier_versions(
    uris: list[str],
    models: list[OnnxClassifier],
    texts: list[str],
    values: list,
    where: str,
    field: str,
    gate: RegistryConfig,
    batch_size: int,
) -> tuple[list[dict], list[GateDecision]]:
    """Each classifier's report on the rows, and each one's paired comparison with the first."""
    versions, runs = [], []
    for uri, model in zip(uris, models):
        y = class_indices(values, model.labels, where, field, uri)
        probs = model.predict_proba(texts, batch_size)
        runs.append((model.labels, y, probs))
        versions.append(
            classification_report(y, probs, model.labels)
            | {"ci": bootstrap_intervals(y, probs, model.labels, resamples=gate.bootstrap_resamples)}
        )
    (labels, y, probs), decisions = runs[0], []
    for other_labels, _, other_probs in runs[1:]:
        if other_labels != labels:
            decisions.append(
                GateDecision(False, f"the two versions' classes differ ({labels} vs {other_labels}): not comparable")
            )
        else:
            decisions.append(compare_classifiers(y, probs, other_probs, gate))
    return versions, decisions


def log_report(tracking: Tracking | None, report: dict, main: str) -> None:
    """The report as an artifact of an `evaluate_versions` run, its headline figures as metrics."""
    headline = (
        {"accuracy": "accuracy", "macro_f1": "macro_f1", "ece": "ece"}
        if report["kind"] == "classifier"
        else {"bpb": "bpb", "doc_bpb_mean": "mean", "doc_bpb_median": "median"}
    )  # metric -> report key
    uris = [v["uri"] for v in report["versions"]]
    with stage_run(tracking, "evaluate_versions", tags={"gptcore.eval_data_digest": report["data_digest"]}) as run:
        run.log_params({"data": report["data"], "rows": report["rows"], "models": " ".join(uris)})
        metrics = {
            f"model{i}/{metric}": v[key] for i, v in enumerate(report["versions"]) for metric, key in headline.items()
        }
        for i, c in enumerate(report["comparisons"], start=1):
            metrics[f"model{i}/promote"] = float(c["promote"])
            if c["figures"]:
                metrics[f"model{i}/{main}_delta"] = c["figures"][main]["delta"]
                metrics |= dict(zip((f"model{i}/{main}_ci_low", f"model{i}/{main}_ci_high"), c["figures"][main]["ci"]))
        run.log_metrics(metrics)
        run.log_dict(report, "evaluate_versions.json")
