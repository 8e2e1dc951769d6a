"""The `gptcore` command: verbs exist, errors are one clear line, verbs chain through --workdir."""

import json

import pyarrow.parquet as pq
import pytest

from gptcore.cli import build_parser, main
from tests.conftest import write_labelled_corpus

pytestmark = pytest.mark.usefixtures("restore_gptcore_logger")  # main() sets up console logging


VERBS = [
    "pipeline",
    "ingest",
    "tokenizer",
    "pretrain",
    "finetune",
    "sft",
    "compress",
    "chat",
    "evaluate",
    "export",
    "register",
    "generate",
    "score",
    "explain",
    "serve",
]


def test_every_stage_has_a_verb():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert sorted(sub.choices) == sorted(VERBS)


def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pretrain:\n  lr: -1.0\n")
    assert main(["ingest", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.lr" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_unknown_source_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  sources: ['ftp2:corpus']\n")
    assert main(["ingest", "--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-tracking"]) == 2
    assert "unknown source kind 'ftp2'" in capsys.readouterr().err


def test_ingest_then_tokenizer_chain_through_the_workdir(tmp_path, capsys):
    corpus = write_labelled_corpus(tmp_path / "corpus.jsonl", docs_per_label=5)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[ingest]\nsources = ["{corpus}"]\nmetadata_fields = ["label"]\n[tokenizer]\nvocab_size = 300\n')
    common = ["--config", str(cfg), "--workdir", str(tmp_path / "w"), "--no-tracking"]
    assert main(["ingest", *common]) == 0
    assert main(["tokenizer", *common]) == 0
    tokens = json.loads((tmp_path / "w" / "tokenizer" / "tokens.json").read_text())
    assert (
        tokens["splits"]["train"]["documents"]
        + tokens["splits"]["val"]["documents"]
        + tokens["splits"]["test"]["documents"]
        == 10
    )


def test_generate_and_score_verbs(lm_package, classifier_package, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                lm_package.package_dir,
                "--prompt",
                "wave",
                "--max-new-tokens",
                "5",
                "--seed",
                "0",
                "--device",
                "cpu",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("wave")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "wave salt"}\n{"text": "hill barn"}\n')
    out = tmp_path / "out.parquet"
    assert (
        main(
            [
                "score",
                "--model",
                classifier_package.package_dir,
                "--input",
                str(src),
                "--output",
                str(out),
                "--device",
                "cpu",
                "--workdir",
                str(tmp_path),
                "--no-tracking",
            ]
        )
        == 0
    )
    assert pq.read_table(out).num_rows == 2


def test_generate_refuses_a_classifier(classifier_package, tmp_path, capsys):
    assert (
        main(["generate", "--model", classifier_package.package_dir, "--prompt", "x", "--workdir", str(tmp_path)]) == 2
    )
    assert "needs a language model" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "evaluate", "export"])
def test_stage_before_its_input_exists_says_what_to_run(verb, tmp_path, capsys):
    assert main([verb, "--workdir", str(tmp_path / "empty"), "--no-tracking"]) == 2
    assert "run `gptcore" in capsys.readouterr().err
