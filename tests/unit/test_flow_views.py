"""What the flows show a person in Prefect and MLflow: every markdown table reads whole in a
GitHub-flavoured renderer (Prefect's artifacts), a value holding `|` or a newline staying in its
cell, and the pipeline run's headline figures under sectioned metric names."""

import re
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from markdown_it import MarkdownIt

from flows.summary import drift_markdown, headline_metrics, pipeline_summary, promotion_markdown, scoring_markdown
from gptcore.registry.register import RegisterResult
from gptcore.registry.score import ScoreResult
from gptcore.tracking import TrackingSettings

PIPE_REASON = "gain 0.0100 | interval 0.002-0.018\nabove the threshold"  # a reason with a pipe and a newline


def gfm_tables(markdown: str) -> list[list[list[str]]]:
    """The tables of a markdown text as a GFM renderer reads them: rows of cell texts, header first.

    The renderer drops the cells beyond the header's count, so a row split by a stray `|` would
    lose text here rather than gain a cell: `raw_cell_counts` sees that one.
    """
    tables: list[list[list[str]]] = []
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    for token, following in pairwise(tokens):
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            tables[-1].append([])
        elif token.type in ("th_open", "td_open"):
            tables[-1][-1].append(following.content)
    return tables


def raw_cell_counts(markdown: str) -> list[int]:
    """Per table line, its cells as written: split on the pipes a `\\` does not escape."""
    return [len(re.split(r"(?<!\\)\|", line)) - 2 for line in markdown.splitlines() if line.startswith("|")]


def registration(name: str, reason: str = "first version of this model") -> RegisterResult:
    return RegisterResult(name, "2", "test_bpb", 1.2345, "1", True, reason)


def pipeline_results(tmp_path: Path, with_branches: bool) -> dict:
    """What the pipeline hands `pipeline_summary`: fakes with the fields it reads."""
    parity = {"max_abs_logit_diff": 2.5e-6, "greedy_tokens_equal": 32, "greedy_tokens": 32}
    samples = tmp_path / "sft_samples.md"
    branch = {
        "finetuned": NS(),
        "cls_eval": NS(
            test={"accuracy": 0.8, "macro_f1": 0.7, "ci": {"macro_f1": (0.6, 0.8)}, "ece": 0.05},
            majority={"accuracy": 0.5, "macro_f1": 0.3, "majority_class": "comedies"},
        ),
        "cls_pkg": NS(parity=parity, package_dir="export/classifier"),
        "cls_reg": registration("gptcore-classifier", PIPE_REASON),
        "scores": NS(output_path="scores/test_scores.parquet", rows=12, provider="CPUExecutionProvider"),
        "chat": NS(steps=40),
        "chat_eval": NS(
            tuned={"response_bpb": 2.0},
            base={"response_bpb": 2.5},
            bpb_gain_ci=(0.3, 0.7),
            history=None,
            samples_path=str(samples),
        ),
        "chat_pkg": NS(parity=parity, package_dir="export/chat"),
        "chat_reg": registration("gptcore-chat"),
    }
    return {
        "workdir": tmp_path,
        "settings": TrackingSettings("sqlite:///mlflow.db", None, None, "gptcore"),
        "experiment_id": "1",
        "seconds": 61.5,
        "skipped": {"classifier": None, "chat": None, "score": None}
        if with_branches
        else {"classifier": "classifier: skipped | no labels", "chat": "chat: skipped\nno dialogue", "score": None},
        "data": NS(documents={"train": 8, "val": 1, "test": 1}, digest="ab" * 32),
        "tokens": NS(tokens={"train": 900, "val": 100, "test": 100}, vocab_size=512),
        "pretrained": NS(num_params=1.5e6, steps=100, train_seconds=30.0),
        "lm_eval": NS(test={"bpb": 3.1, "perplexity": 20.0}, unigram_bpb={"test": 4.2}),
        "lm_pkg": NS(parity=parity, package_dir="export/lm"),
        "lm_reg": registration("gptcore-lm"),
        **{k: v if with_branches else None for k, v in branch.items()},
    }


@pytest.mark.parametrize("with_branches", [True, False], ids=["every-branch", "branches-skipped"])
def test_the_summary_table_has_a_header_and_every_value_in_its_cell(tmp_path, with_branches):
    summary = pipeline_summary(**pipeline_results(tmp_path, with_branches))
    (table,) = gfm_tables(summary["markdown"])
    header, *rows = table
    assert all(header) and len(header) == 2  # a header that names its columns
    assert set(raw_cell_counts(summary["markdown"])) == {2}
    values = dict(rows)
    assert values["ONNX parity"].count("max |dlogit|") == (3 if with_branches else 1)
    if with_branches:
        assert PIPE_REASON.replace("\n", " / ") in values["model gptcore-classifier"]
    else:
        assert [v for k, v in rows if k == "skipped"] == [
            "classifier: skipped | no labels",
            "chat: skipped / no dialogue",
        ]


def test_the_promotion_table_keeps_a_reason_with_a_pipe():
    markdown = promotion_markdown([registration("gptcore-lm"), registration("gptcore-classifier", PIPE_REASON)])
    (table,) = gfm_tables(markdown)
    assert table[0] == ["model", "version", "metric", "decision", "champion", "reason"]
    assert [row[5] for row in table[1:]] == ["first version of this model", PIPE_REASON.replace("\n", " / ")]
    assert set(raw_cell_counts(markdown)) == {6}


def test_scoring_and_drift_tables_keep_a_label_with_a_pipe():
    drift = {
        "reference": "test-set predictions of v2",
        "reference_examples": 40,
        "reference_label_shares": {"tragedies|histories": 0.5, "comedies": 0.5},
        "label_psi": 0.4,
        "confidence_psi": 0.3,
        "threshold": 0.25,
        "warning": True,
    }
    spread = {"mean": 0.7, "p10": 0.5, "p50": 0.7, "p90": 0.9, "max": 1.0}
    result = ScoreResult(
        "out.parquet", 10, "models:/gptcore-classifier@champion", "2", "CPUExecutionProvider",
        {"tragedies|histories": 9, "comedies": 1}, 1.0, 1, 0, {"tragedies|histories": 0.9, "comedies": 0.1},
        spread, spread, spread, drift, True,
    )  # fmt: skip
    for markdown, tables in ((scoring_markdown(result), 1), (drift_markdown(result), 2)):
        found = gfm_tables(markdown)
        assert len(found) == tables
        labels = found[-1]
        assert [row[0] for row in labels[1:]] == ["tragedies|histories", "comedies"]
        assert labels[1][1:] == ["9", "90.0%", "50.0%"]
        # every line of each table (header, rule, rows) has that table's number of cells
        assert raw_cell_counts(markdown) == [len(table[0]) for table in found for _ in range(len(table) + 1)]


def test_headline_figures_are_sectioned_metrics_and_skipped_ones_left_out(tmp_path):
    every = headline_metrics(pipeline_summary(**pipeline_results(tmp_path, True)))
    assert every["pipeline/seconds"] == 61.5 and "pipeline_seconds" not in every
    assert every["lm/test_bpb"] == 3.1 and every["lm/unigram_test_bpb"] == 4.2
    assert every["classifier/test_macro_f1"] == 0.7 and every["chat/test_response_bpb"] == 2.0
    assert (every["classifier/test_macro_f1_ci_low"], every["classifier/test_macro_f1_ci_high"]) == (0.6, 0.8)
    assert every["parity/lm_max_abs_logit_diff"] == every["parity/chat_max_abs_logit_diff"] == 2.5e-6
    assert all(isinstance(v, (int, float)) for v in every.values())
    lm_only = headline_metrics(pipeline_summary(**pipeline_results(tmp_path, False)))
    assert not [name for name in lm_only if name.startswith(("classifier/", "chat/", "majority/"))]
    assert set(lm_only) < set(every) and "parity/classifier_max_abs_logit_diff" not in lm_only
