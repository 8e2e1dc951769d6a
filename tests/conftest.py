"""Shared fixtures and helpers: small corpora built by the tests, tiny configs and models trained on
them, their ONNX packages, a real MLflow store, one Prefect server per session; the markers."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptcore.config import (
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    IngestConfig,
    ModelConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
)
from gptcore.tracking import Tracking, TrackingSettings
from tests.servers import servers  # noqa: F401  (session fixture: the secured Prefect and MLflow servers)
from tests.stack import stack  # noqa: F401  (session fixture: the process stack of gptcore.stack)

REPO = Path(__file__).resolve().parents[1]
# For tests that run gptcore in a subprocess: one thread, fixed hashing, this checkout first on the path.
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}

WORDS = {
    "sea": ["wave", "salt", "ship", "sail", "tide", "anchor", "harbour", "gull", "storm", "deck"],
    "land": ["hill", "field", "plough", "barn", "wheat", "orchard", "fence", "meadow", "cart", "stone"],
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


def write_chat(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Conversations of topic words: the reply names the topic and repeats the prompt's first word,
    and every third conversation then asks "again?", whose right answer only the history holds."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.choice(sorted(WORDS))
            words = [rng.choice(WORDS[topic]) for _ in range(6)]
            reply = f"{topic}: {words[0]} {words[0]}"
            if i % 3 == 1:
                record = {"prompt": " ".join(words), "response": reply}
            else:
                turns = [("user", " ".join(words)), ("assistant", reply)]
                if i % 3 == 2:
                    turns += [("user", "again?"), ("assistant", reply)]
                record = {"messages": [{"role": role, "content": text} for role, text in turns]}
            f.write(json.dumps(record) + "\n")
    return path


def sft_cfg(data, **overrides) -> SFTConfig:
    """A chat SFT config small enough for the tests: 120 steps on CPU, few held-out conversations."""
    return SFTConfig(
        **{
            "data": data and str(data),
            "max_steps": 120,
            "batch_size": 16,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 5,
            "eval_interval": 40,
            "eval_batches": 2,
            "log_interval": 40,
            "checkpoint_interval": 120,
            "device": "cpu",
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "eval_conversations": 60,
            "samples": 2,
            "max_new_tokens": 8,
            **overrides,
        }
    )


def sqlite_tracking(root: Path) -> Tracking:
    """A real MLflow store in `root`: a SQLite file and local artifacts, experiment "test"."""
    return Tracking(
        TrackingSettings(
            tracking_uri=f"sqlite:///{root}/mlflow.db",
            registry_uri=None,
            artifact_location=str(root / "artifacts"),
            experiment="test",
        )
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Every integration test is `slow`, every test under tests/faults is `faults`; a `gpu` test is
    skipped, saying why, where there is no CUDA GPU."""
    integration = Path(__file__).parent / "integration"
    faults = Path(__file__).parent / "faults"
    no_gpu = None
    for item in items:
        if integration in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
        if faults in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)
        if item.get_closest_marker("gpu") is not None:
            if no_gpu is None:
                no_gpu = cuda_unavailable()
            if no_gpu:
                item.add_marker(pytest.mark.skip(reason=no_gpu))


def cuda_unavailable() -> str:
    """Why the GPU tests cannot run here ('' when they can)."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return ""


def topic_texts(n: int, topics=("sea", "land"), seed: int = 0) -> list[str]:
    """Texts of 12 words, each from one topic, the topics taking turns."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[topics[i % len(topics)]]) for _ in range(12)) for i in range(n)]


def write_input(path: Path, table: pa.Table) -> None:
    """`table` as the file type `path` names: .jsonl, .csv or .parquet."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    elif path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)


def input_file(tmp_path: Path, suffix: str, n: int = 45) -> Path:
    """A file of `n` labelled topic texts to score."""
    src = tmp_path / f"in{suffix}"
    labels = ["sea", "land"] * (n // 2) + ["sea"] * (n % 2)
    write_input(src, pa.table({"id": list(range(n)), "text": topic_texts(n), "label": labels}))
    return src


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """Ingested + tokenized two-topic corpus: {'data': dir, 'tokenizer': dir, 'root': dir}."""
    from gptcore.data.ingest import ingest
    from gptcore.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("small")
    source = write_labelled_corpus(root / "corpus.jsonl")
    ingest(
        IngestConfig(sources=[str(source)], metadata_fields=["label"], val_fraction=0.15, test_fraction=0.15),
        root / "data",
    )
    train_tokenizer(TokenizerConfig(vocab_size=300, min_frequency=1), root / "data", root / "tokenizer")
    return {"root": root, "data": root / "data", "tokenizer": root / "tokenizer"}


def repackaged(package_dir: str | Path, into: Path) -> Path:
    """The same model in another package (one more file): registered, a version of its own, where
    the same package and evaluation registered again would reuse their version."""
    other = Path(shutil.copytree(package_dir, into))
    (other / "NOTES.txt").write_text("the same weights, packaged again", encoding="utf-8")
    return other


def tiny_model() -> ModelConfig:
    """A GPT that trains in seconds."""
    return ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny_train() -> TrainConfig:
    """20 steps on the CPU, evaluated and checkpointed at 10 and 20."""
    return TrainConfig(
        max_steps=20,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_interval=10,
        eval_batches=2,
        log_interval=5,
        checkpoint_interval=10,
        keep_checkpoints=5,
        device="cpu",
    )


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return tiny_model()


@pytest.fixture
def tiny_train_cfg() -> TrainConfig:
    return tiny_train()


@pytest.fixture
def mlflow_tracking(tmp_path) -> Tracking:
    """A real MLflow store (SQLite file + local artifacts) private to the test."""
    return sqlite_tracking(tmp_path)


@pytest.fixture(scope="session")
def pretrained(small_corpus, tmp_path_factory):
    """A tiny GPT pretrained for 30 steps on the small corpus: the fine-tuning tests' starting point."""
    from gptcore.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("pre")
    pretrain(
        ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(max_steps=30, batch_size=8, warmup_steps=2, eval_interval=30, checkpoint_interval=30, device="cpu"),
        small_corpus["tokenizer"],
        out,
    )
    return out


@pytest.fixture(scope="session")
def trained(small_corpus, tmp_path_factory):
    """A tiny GPT pretrained and a classifier fine-tuned on the small corpus."""
    from gptcore.train.finetune import finetune
    from gptcore.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("trained")
    pretrain(
        ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(
            max_steps=100, batch_size=8, warmup_steps=5, eval_interval=50, checkpoint_interval=100, device="cpu"
        ),
        small_corpus["tokenizer"],
        root / "pre",
    )
    finetune(
        FinetuneConfig(
            label_field="label",
            passage_tokens=24,
            max_steps=80,
            batch_size=16,
            warmup_steps=5,
            eval_interval=40,
            checkpoint_interval=80,
            device="cpu",
        ),
        root / "pre",
        small_corpus["data"],
        small_corpus["tokenizer"],
        root / "ft",
    )
    return {**small_corpus, "pre": root / "pre", "ft": root / "ft", "root": root}


@pytest.fixture(scope="session")
def chat_trained(trained, tmp_path_factory):
    """The tiny GPT fine-tuned to chat on the topic conversations of `write_chat`, and evaluated."""
    from gptcore.eval.chat import evaluate_sft
    from gptcore.train.sft import sft

    root = tmp_path_factory.mktemp("sft")
    cfg = sft_cfg(write_chat(root / "chat.jsonl"))
    tracking = sqlite_tracking(root)
    result = sft(cfg, trained["pre"], trained["data"], trained["tokenizer"], root / "sft", tracking)
    report = evaluate_sft(
        cfg, root / "sft", trained["pre"], trained["data"], trained["tokenizer"], root / "eval", tracking
    )
    return {**trained, "cfg": cfg, "result": result, "report": report, "root": root, "tracking": tracking}


@pytest.fixture(scope="session")
def chat_package(chat_trained):
    """The tiny chat model exported to an ONNX package (parity-checked)."""
    from gptcore.export.chat import export_chat_onnx

    return export_chat_onnx(
        ExportConfig(),
        chat_trained["cfg"],
        chat_trained["root"] / "sft",
        chat_trained["data"],
        chat_trained["root"] / "chat",
    )


@pytest.fixture(scope="session")
def lm_package(trained):
    """The tiny GPT exported to an ONNX package (parity-checked)."""
    from gptcore.export.lm import export_lm_onnx

    return export_lm_onnx(ExportConfig(), trained["pre"], trained["tokenizer"], trained["root"] / "lm")


@pytest.fixture(scope="session")
def classifier_package(trained):
    """The tiny classifier exported to an ONNX package (parity-checked)."""
    from gptcore.export.classifier import export_classifier_onnx

    return export_classifier_onnx(
        ExportConfig(), trained["ft"], trained["data"], trained["tokenizer"], trained["root"] / "clf"
    )


@pytest.fixture(scope="session")
def onnx_classifier(classifier_package):
    """The tiny classifier's package in an ONNX Runtime session (CPU, one thread)."""
    from gptcore.runtime import load_model

    return load_model(classifier_package.package_dir, device="cpu", threads=1)


@pytest.fixture(scope="session")
def lm_evaluation(trained, tmp_path_factory):
    """The tiny GPT evaluated on the small corpus, each test document scored on its own."""
    from gptcore.eval.lm import evaluate_lm

    return evaluate_lm(
        EvalConfig(prompts=["x"], max_new_tokens=1),
        trained["pre"],
        trained["tokenizer"],
        tmp_path_factory.mktemp("lm_eval"),
        data_dir=trained["data"],
    )


@pytest.fixture(scope="session")
def classifier_evaluation(trained, tmp_path_factory):
    """The tiny classifier evaluated on its test split (report, predictions, scoring reference)."""
    from gptcore.eval.classifier import evaluate_classifier

    return evaluate_classifier(trained["ft"], trained["data"], trained["tokenizer"], tmp_path_factory.mktemp("eval"))


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
