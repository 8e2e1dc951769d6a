"""Promotion of a registered version on a labelled file (`promote_version`, the promotion
deployment's work): real classifiers through ONNX Runtime, a real MLflow store (SQLite)."""

from __future__ import annotations

import json

import pytest

from gptcore.config import ExportConfig, FinetuneConfig
from gptcore.errors import InputError
from gptcore.layout import CHAMPION
from gptcore.registry.promotion import promote_version
from gptcore.registry.register import register
from tests.unit.registry.test_compare import rows, write_jsonl


@pytest.fixture(scope="module")
def weak_classifier(trained, tmp_path_factory):
    """A classifier fine-tuned for 3 steps from the same GPT: near chance on the two topics."""
    from gptcore.export.classifier import export_classifier_onnx
    from gptcore.train.finetune import finetune

    root = tmp_path_factory.mktemp("weak")
    finetune(
        FinetuneConfig(
            label_field="label",
            passage_tokens=24,
            max_steps=3,
            batch_size=16,
            warmup_steps=1,
            eval_interval=3,
            checkpoint_interval=3,
            device="cpu",
        ),
        trained["pre"],
        trained["data"],
        trained["tokenizer"],
        root / "ft",
    )
    return export_classifier_onnx(ExportConfig(), root / "ft", trained["data"], trained["tokenizer"], root / "clf")


def test_a_better_version_takes_champion_only_through_the_gate(
    weak_classifier, classifier_package, mlflow_tracking, tmp_path
):
    stored = tmp_path / "eval.json"
    stored.write_text(json.dumps({"test": {"macro_f1": 0.9}}))
    register(weak_classifier.package_dir, stored, "clf", mlflow_tracking)  # v1: champion, the first version
    stored.write_text(json.dumps({"test": {"macro_f1": 0.5}}))
    good = register(classifier_package.package_dir, stored, "clf", mlflow_tracking)  # v2: kept, by its stored metric
    assert good.version == "2" and not good.promoted
    data = write_jsonl(tmp_path / "labelled.jsonl", [{"text": t, "label": label} for t, label in rows(40)])
    client = mlflow_tracking.client()

    kept = promote_version("clf", 1, data, mlflow_tracking, device="cpu")  # the champion itself
    assert (kept.promoted, kept.champion, kept.reason) == (False, "1", "v1 is already the champion")

    report = tmp_path / "report.json"
    promoted = promote_version("clf", "2", data, mlflow_tracking, output=report, device="cpu")
    assert promoted.promoted and (promoted.champion_before, promoted.champion) == ("1", "2")
    assert promoted.reason.startswith(f"on {data}, against champion v1: macro-F1 +")
    assert str(client.get_model_version_by_alias("clf", CHAMPION).version) == "2"
    assert client.get_model_version("clf", "2").tags["gptcore.promotion"] == promoted.reason
    assert client.get_model_version("clf", "1").tags["gptcore.challenge.v2"].startswith("lost to v2: ")
    (comparison,) = json.loads(report.read_text())["comparisons"]
    assert comparison["baseline"] == "models:/clf/1" and comparison["candidate"] == "models:/clf/2"

    back = promote_version("clf", 1, data, mlflow_tracking, device="cpu")  # the weak one, now the challenger
    assert not back.promoted and back.champion == "2"
    assert str(client.get_model_version_by_alias("clf", CHAMPION).version) == "2"
    assert client.get_model_version("clf", "2").tags["gptcore.challenge.v1"].startswith("kept against v1: ")

    with pytest.raises(InputError, match=r"models:/clf/7: no such registered version"):
        promote_version("clf", 7, data, mlflow_tracking, device="cpu")
