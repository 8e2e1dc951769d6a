"""Shared fixtures: small corpora built by the tests, tiny configs, a real MLflow store."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gptcore.config import ExportConfig, FinetuneConfig, IngestConfig, ModelConfig, TokenizerConfig, TrainConfig
from gptcore.tracking import Tracking, TrackingSettings
from tests.servers import servers  # noqa: F401  (session fixture: the secured Prefect and MLflow servers)

WORDS = {
    "sea": "wave salt ship sail tide anchor harbour gull storm deck".split(),
    "land": "hill field plough barn wheat orchard fence meadow cart stone".split(),
}


def write_labelled_corpus(path: Path, docs_per_label: int = 20, seed: int = 0) -> Path:
    """A JSONL corpus of two topics whose words differ: a classifier can learn it quickly."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for label, words in WORDS.items():
            for i in range(docs_per_label):
                text = " ".join(rng.choice(words) for _ in range(300)) + f". {label} {i}."
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """Ingested + tokenized two-topic corpus: {'data': dir, 'tokenizer': dir, 'root': dir}."""
    from gptcore.data.ingest import ingest
    from gptcore.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("small")
    source = write_labelled_corpus(root / "corpus.jsonl")
    ingest(IngestConfig(sources=[str(source)], metadata_fields=["label"], val_fraction=0.15, test_fraction=0.15),
           root / "data")
    train_tokenizer(TokenizerConfig(vocab_size=300, min_frequency=1), root / "data", root / "tokenizer")
    return {"root": root, "data": root / "data", "tokenizer": root / "tokenizer"}


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tiny_train_cfg() -> TrainConfig:
    return TrainConfig(max_steps=20, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=10,
                       eval_batches=2, log_interval=5, checkpoint_interval=10, keep_checkpoints=5, device="cpu")


@pytest.fixture
def mlflow_tracking(tmp_path) -> Tracking:
    """A real MLflow store (SQLite file + local artifacts) private to the test."""
    return Tracking(TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registry_uri=None,
                                     artifact_location=str(tmp_path / "artifacts"), experiment="test"))


@pytest.fixture(scope="session")
def trained(small_corpus, tmp_path_factory):
    """A tiny GPT pretrained and a classifier fine-tuned on the small corpus."""
    from gptcore.finetune import finetune
    from gptcore.pretrain import pretrain

    root = tmp_path_factory.mktemp("trained")
    pretrain(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
             TrainConfig(max_steps=100, batch_size=8, warmup_steps=5, eval_interval=50, checkpoint_interval=100,
                         device="cpu"),
             small_corpus["tokenizer"], root / "pre")
    finetune(FinetuneConfig(label_field="label", passage_tokens=24, max_steps=80, batch_size=16, warmup_steps=5,
                            eval_interval=40, checkpoint_interval=80, device="cpu"),
             root / "pre", small_corpus["data"], small_corpus["tokenizer"], root / "ft")
    return {**small_corpus, "pre": root / "pre", "ft": root / "ft", "root": root}


@pytest.fixture(scope="session")
def lm_package(trained):
    """The tiny GPT exported to an ONNX package (parity-checked)."""
    from gptcore.export import export_lm_onnx

    return export_lm_onnx(ExportConfig(), trained["pre"], trained["tokenizer"], trained["root"] / "lm")


@pytest.fixture(scope="session")
def classifier_package(trained):
    """The tiny classifier exported to an ONNX package (parity-checked)."""
    from gptcore.export import export_classifier_onnx

    return export_classifier_onnx(ExportConfig(), trained["ft"], trained["data"], trained["tokenizer"],
                                  trained["root"] / "clf")


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (and database) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def restore_gptcore_logger():
    """main() sets up console logging on the 'gptcore' logger; leave it as other tests expect."""
    import logging

    logger = logging.getLogger("gptcore")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
