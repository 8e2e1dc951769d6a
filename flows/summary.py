"""What the flows show a person: the end-of-pipeline summary (where the runs, models and files are,
and the headline metrics), and the promotion, scoring and drift reports as markdown artifacts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gptcore.errors import redact
from gptcore.markdown import table as markdown_table
from gptcore.registry.drift import CONFIDENCE_BINS
from gptcore.registry.score import ScoreResult
from gptcore.tracking import TrackingSettings


def pipeline_summary(
    *,
    workdir: Path,
    settings: TrackingSettings,
    experiment_id: str,
    seconds: float,
    skipped: dict[str, str | None],
    data,
    tokens,
    pretrained,
    finetuned,
    chat,
    lm_eval,
    cls_eval,
    chat_eval,
    lm_pkg,
    cls_pkg,
    chat_pkg,
    lm_reg,
    cls_reg,
    chat_reg,
    scores,
    chat_versions: str | None = None,
) -> dict[str, Any]:
    """The end-of-run summary: as text, as markdown and as figures. The results of a skipped branch
    are None; its figures are None too, and `skipped` says why it did not run. `chat_versions`, the
    new chat version's answers beside the champion's, ends the markdown. The tracking URI appears
    redacted: the summary is logged, kept as a Prefect artifact and as an MLflow artifact."""
    tracking_uri = redact(settings.tracking_uri)
    history = chat_eval.history if chat_eval is not None else None
    majority = cls_eval.majority if cls_eval is not None else {}
    headline = {
        "lm_test_bpb": lm_eval.test["bpb"],
        "lm_unigram_test_bpb": lm_eval.unigram_bpb["test"],
        "lm_test_perplexity": lm_eval.test["perplexity"],
        "classifier_test_accuracy": cls_eval and cls_eval.test["accuracy"],
        "classifier_test_macro_f1": cls_eval and cls_eval.test["macro_f1"],
        "classifier_test_macro_f1_ci": cls_eval and cls_eval.test["ci"]["macro_f1"],
        "classifier_test_ece": cls_eval and cls_eval.test["ece"],
        "chat_test_response_bpb": chat_eval and chat_eval.tuned["response_bpb"],
        "chat_base_test_response_bpb": chat_eval and chat_eval.base["response_bpb"],
        "chat_test_response_bpb_gain_ci": chat_eval and chat_eval.bpb_gain_ci,
        "chat_history_gain": history and history["gain"],
        "chat_history_gain_ci": history and history["gain_ci"],
        "majority_test_accuracy": majority.get("accuracy"),
        "majority_test_macro_f1": majority.get("macro_f1"),
        "lm_parity_max_abs_logit_diff": lm_pkg.parity["max_abs_logit_diff"],
        "lm_parity_greedy_tokens_equal": lm_pkg.parity["greedy_tokens_equal"],
        "classifier_parity_max_abs_logit_diff": cls_pkg and cls_pkg.parity["max_abs_logit_diff"],
        "chat_parity_max_abs_logit_diff": chat_pkg and chat_pkg.parity["max_abs_logit_diff"],
    }
    models = {
        reg.name: {
            "version": reg.version,
            "champion_version": reg.champion_version,
            "promoted": reg.promoted,
            "reason": reg.reason,
            "uri": reg.champion_uri,
        }
        for reg in (lm_reg, cls_reg, chat_reg)
        if reg is not None
    }
    classifier_rows = []
    if cls_eval is not None:
        classifier_rows = [
            (
                "classifier test accuracy",
                f"{headline['classifier_test_accuracy']:.4f} "
                f"(majority '{majority['majority_class']}' {headline['majority_test_accuracy']:.4f})",
            ),
            (
                "classifier test macro-F1",
                f"{headline['classifier_test_macro_f1']:.4f} (95% CI "
                f"{headline['classifier_test_macro_f1_ci'][0]:.4f}-"
                f"{headline['classifier_test_macro_f1_ci'][1]:.4f}; majority "
                f"{headline['majority_test_macro_f1']:.4f}); ECE {headline['classifier_test_ece']:.4f}",
            ),
        ]
    chat_rows = []
    if chat_eval is not None:
        chat_rows = [
            (
                "chat SFT response bits/byte",
                f"{headline['chat_test_response_bpb']:.4f} vs base "
                f"{headline['chat_base_test_response_bpb']:.4f} (gain 95% CI "
                f"{chat_eval.bpb_gain_ci[0]:.4f}-{chat_eval.bpb_gain_ci[1]:.4f}; "
                f"{chat.steps} steps, samples {chat_eval.samples_path})",
            )
        ]
    if history is not None:
        chat_rows.append(
            (
                "chat history",
                f"last answers of {history['conversations']} multi-turn conversations: "
                f"{history['full_history_bpb']:.4f} bits/byte with the history vs "
                f"{history['last_turn_only_bpb']:.4f} after the last user turn alone (gain 95% CI "
                f"{history['gain_ci'][0]:.4f}-{history['gain_ci'][1]:.4f})",
            )
        )
    parity = (
        f"LM max |dlogit| {headline['lm_parity_max_abs_logit_diff']:.1e}, greedy "
        f"{headline['lm_parity_greedy_tokens_equal']}/{lm_pkg.parity['greedy_tokens']} equal"
    )
    if cls_pkg is not None:
        parity += f"; classifier max |dlogit| {headline['classifier_parity_max_abs_logit_diff']:.1e}"
    if chat_pkg is not None:
        parity += f"; chat max |dlogit| {headline['chat_parity_max_abs_logit_diff']:.1e}"
    rows = [
        ("wall time", f"{seconds:.0f} s"),
        ("work directory", str(workdir)),
        ("corpus", f"{sum(data.documents.values())} documents, digest {data.digest[:12]}"),
        (
            "tokens (train/val/test)",
            f"{tokens.tokens['train']}/{tokens.tokens['val']}/{tokens.tokens['test']}, vocab {tokens.vocab_size}",
        ),
        (
            "GPT",
            f"{pretrained.num_params / 1e6:.2f}M params, {pretrained.steps} steps in {pretrained.train_seconds:.0f} s",
        ),
        (
            "LM test bits/byte",
            f"{headline['lm_test_bpb']:.4f} (unigram baseline {headline['lm_unigram_test_bpb']:.4f})",
        ),
        *classifier_rows,
        *chat_rows,
        ("ONNX parity", parity),
        *[
            (
                f"model {name}",
                f"v{m['version']} ({'promoted to champion' if m['promoted'] else 'challenger'}: "
                f"{m['reason']}); serve {m['uri']}",
            )
            for name, m in models.items()
        ],
        ("ONNX packages", ", ".join(pkg.package_dir for pkg in (lm_pkg, cls_pkg, chat_pkg) if pkg is not None)),
        *([("scores", f"{scores.output_path} ({scores.rows} rows, {scores.provider})")] if scores is not None else []),
        *[("skipped", reason) for reason in skipped.values() if reason is not None],
        ("MLflow", f"{tracking_uri} (browse: {browse(tracking_uri, experiment_id)})"),
    ]
    width = max(len(k) for k, _ in rows)
    text = "gptcore pipeline finished\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    table = markdown_table(("what", "this run"), rows)
    markdown = "# gptcore pipeline\n\n" + table
    if chat_versions:
        markdown += "\n\n" + re.sub(r"^(#+) ", r"#\1 ", chat_versions, flags=re.M)  # its headings under ours
    return {
        "seconds": seconds,
        "workdir": str(workdir),
        "tracking_uri": tracking_uri,
        "headline": headline,
        "models": models,
        "skipped": {branch: reason for branch, reason in skipped.items() if reason is not None},
        "scores_path": scores and scores.output_path,
        "scores_rows": scores and scores.rows,
        "text": text,
        "table": table,
        "markdown": markdown,
    }


def browse(tracking_uri: str, experiment_id: str) -> str:
    """How to see the runs table: a local store through `mlflow ui`, a tracking server in its own UI.
    The address asks for MLflow's "Model training" view: its UI opens an experiment in GenAI mode."""
    runs = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{runs}"
    return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{runs}"


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's headline figures as metrics of the pipeline run, one section per model
    (`lm/test_bpb`, `classifier/test_macro_f1`, `chat/...`, `majority/...`), the three exports'
    ONNX parity side by side in `parity/...` (`parity/lm_max_abs_logit_diff`), and `pipeline/seconds`.
    An interval is two figures (`..._low`, `..._high`); a skipped branch's figures are left out."""
    metrics = {"pipeline/seconds": summary["seconds"]}
    for key, value in summary["headline"].items():
        section, figure = key.split("_", 1)
        if figure.startswith("parity_"):
            section, figure = "parity", f"{section}_{figure.removeprefix('parity_')}"
        name = f"{section}/{figure}"
        if isinstance(value, (list, tuple)):
            metrics |= {f"{name}_low": value[0], f"{name}_high": value[1]}
        elif isinstance(value, (int, float)):
            metrics[name] = value
    return metrics


def promotion_markdown(registrations) -> str:
    """The registry decisions of one run as a markdown table (a Prefect artifact)."""
    rows = [
        (
            r.name,
            f"v{r.version}",
            f"{r.metric} {r.value:.4f}",
            "promoted" if r.promoted else "challenger",
            f"v{r.champion_version}",
            r.reason,
        )
        for r in registrations
    ]
    return "# Promotion decisions\n\n" + markdown_table(
        ("model", "version", "metric", "decision", "champion", "reason"), rows
    )


def _label_table(result: ScoreResult, now: str) -> str:
    drift = result.drift or {}
    test = drift.get("reference_label_shares", {})
    rows = [
        (label, result.label_counts[label], f"{share:.1%}", format(test[label], ".1%") if label in test else "n/a")
        for label, share in result.label_shares.items()
    ]
    return markdown_table(("label", "rows", now, "share on the test set"), rows)


def scoring_markdown(result: ScoreResult) -> str:
    """A short report of one scoring run (a Prefect artifact)."""
    drift = result.drift
    verdict = (
        "no drift figures: the model has no test-set predictions to compare with"
        if drift is None
        else f"label PSI {drift['label_psi']:.3f}, confidence PSI {drift['confidence_psi']:.3f} against "
        f"{drift['reference']}: {'**above**' if drift['warning'] else 'within'} "
        f"the threshold {drift['threshold']}"
    )
    c, chars, tokens = result.confidence, result.input_chars, result.input_tokens
    return (
        f"# Scoring: {result.rows} rows\n\n"
        f"- model `{result.model_uri}` (v{result.model_version}) on {result.provider}; output `{result.output_path}`\n"
        f"- {result.chunks} chunks ({result.chunks_skipped} kept from an interrupted run) "
        f"in {result.seconds:.1f} s\n"
        f"- confidence mean {c['mean']:.3f} (p10 {c['p10']:.3f}, p50 {c['p50']:.3f}, p90 {c['p90']:.3f})\n"
        f"- input length: characters mean {chars['mean']:.0f} (p50 {chars['p50']:.0f}, p90 {chars['p90']:.0f}, "
        f"max {chars['max']:.0f}); tokens mean {tokens['mean']:.0f} (p50 {tokens['p50']:.0f}, "
        f"p90 {tokens['p90']:.0f}, max {tokens['max']:.0f})\n"
        f"- drift: {verdict}\n\n" + _label_table(result, "share")
    )


def drift_markdown(result: ScoreResult) -> str:
    """Why a scoring run was flagged (a Prefect artifact): the PSI figures and the shares that moved."""
    drift = result.drift
    return (
        f"# Drift warning: `{result.model_uri}` on `{result.output_path}`\n\n"
        f"The predictions on these {result.rows} rows are distributed unlike the model's predictions on its "
        f"test set ({drift['reference']}, {drift['reference_examples']} examples).\n\n"
        + markdown_table(
            ("population stability index", "value", "threshold"),
            [
                ("predicted labels", f"{drift['label_psi']:.3f}", drift["threshold"]),
                (f"confidence ({CONFIDENCE_BINS} bins)", f"{drift['confidence_psi']:.3f}", drift["threshold"]),
            ],
        )
        + "\n\n"
        "PSI below 0.1 reads as stable, 0.1 to 0.25 as a moderate shift, above 0.25 as a major one. "
        "The inputs may come from another population than the training data (another topic, source or "
        "length), or the world moved: check a sample of the rows before trusting the labels.\n\n"
        + _label_table(result, "share now")
        + f"\n\nconfidence mean now {result.confidence['mean']:.3f}; input tokens p50 "
        f"{result.input_tokens['p50']:.0f}, max {result.input_tokens['max']:.0f}"
    )
