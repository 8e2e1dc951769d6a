"""Registered versions evaluated side by side on one data file (ONNX Runtime), from Python and the CLI."""

import json
import random

import pytest

from gptcore.cli import main
from gptcore.errors import InputError
from gptcore.metrics import document_distribution
from gptcore.registry.compare import evaluate_versions
from gptcore.registry.register import register
from tests.conftest import WORDS

pytestmark = pytest.mark.usefixtures("restore_gptcore_logger")  # main() sets up console logging


def rows(n_per_label: int = 8, seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (" ".join(rng.choice(words) for _ in range(30)), label)
        for label, words in WORDS.items()
        for _ in range(n_per_label)
    ]


def write_csv(path, labels_as):
    path.write_text("text,label\n" + "".join(f"{text},{labels_as(label)}\n" for text, label in rows()))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def two_versions(classifier_package, mlflow_tracking, tmp_path):
    """The same classifier package registered twice: two versions that are one model."""
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"test": {"macro_f1": 0.9}}))
    versions = [register(classifier_package.package_dir, evaluation, "clf", mlflow_tracking).version for _ in range(2)]
    return [f"models:/clf/{v}" for v in versions]


def test_two_registered_versions_on_csv_with_integer_labels(
    two_versions, classifier_package, mlflow_tracking, tmp_path
):
    labels = ["land", "sea"]  # the package's classes: the train labels, sorted
    data = write_csv(tmp_path / "data.csv", labels.index)
    settings = mlflow_tracking.settings
    report = evaluate_versions(
        two_versions,
        data,
        output=tmp_path / "report.json",
        tracking=mlflow_tracking,
        tracking_uri=settings.tracking_uri,
        device="cpu",
    )
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["kind"] == "classifier" and report["rows"] == 16 and report["label_field"] == "label"
    first, second = report["versions"]
    assert first["labels"] == labels and first["accuracy"] >= 0.75  # the topics' words tell them apart
    assert first["accuracy"] == second["accuracy"] and first["confusion_matrix"] == second["confusion_matrix"]
    (comparison,) = report["comparisons"]
    assert comparison["baseline"] == two_versions[0] and comparison["candidate"] == two_versions[1]
    assert comparison["figures"]["macro_f1"] == {"delta": 0.0, "ci": [0.0, 0.0]}
    assert comparison["verdict"] == "no significant difference" and not comparison["promote"]
    assert "not a significant improvement" in comparison["reason"]
    run = mlflow_tracking.client().search_runs(
        [mlflow_tracking.experiment_id()], "tags.`gptcore.stage` = 'evaluate_versions'"
    )[0]
    assert run.data.metrics["model1/accuracy"] == second["accuracy"] and run.data.metrics["model1/promote"] == 0.0

    jsonl = write_jsonl(tmp_path / "data.jsonl", [{"text": t, "label": label} for t, label in rows()])
    by_name = evaluate_versions(two_versions[:1], jsonl, tracking_uri=settings.tracking_uri, device="cpu")
    assert by_name["versions"][0]["accuracy"] == first["accuracy"] and by_name["comparisons"] == []


def test_bad_labels_and_mixed_kinds_are_clear_errors(classifier_package, lm_package, tmp_path):
    clf = classifier_package.package_dir
    unknown = write_jsonl(
        tmp_path / "u.jsonl",
        [{"text": "wave", "label": "sea"}, {"text": "hill", "label": "land"}, {"text": "river", "label": "river"}],
    )
    with pytest.raises(InputError, match=r"row 2 .*label 'river' is not a class of"):
        evaluate_versions([clf], unknown, device="cpu")
    out_of_range = write_csv(tmp_path / "r.csv", lambda label: 5)
    with pytest.raises(InputError, match=r"row 0 .*label 5 is not a class"):
        evaluate_versions([clf], out_of_range, device="cpu")
    with pytest.raises(InputError, match="no label column 'topic'"):
        evaluate_versions([clf], unknown, label_field="topic", device="cpu")
    with pytest.raises(InputError, match="only versions of one kind"):
        evaluate_versions([clf, lm_package.package_dir], unknown, device="cpu")


def test_language_models_compare_on_per_document_bits_per_byte(lm_package, trained):
    from gptcore.eval.lm import score_test_documents
    from gptcore.results import load_pretrained, load_tokenized, load_tokenizer
    from gptcore.weights import load_lm

    test_split = trained["data"] / "test.parquet"
    report = evaluate_versions([lm_package.package_dir, lm_package.package_dir], test_split, device="cpu")
    assert report["kind"] == "lm" and "label_field" not in report
    (comparison,) = report["comparisons"]
    assert comparison["figures"]["reduction"]["delta"] == 0.0 and comparison["figures"]["reduction"]["ci"] == [0, 0]
    assert comparison["verdict"] == "no significant difference" and not comparison["promote"]
    # ONNX Runtime on the Parquet's texts scores what the evaluation stage's PyTorch scores on the shards.
    model, _ = load_lm(load_pretrained(trained["pre"]).best_dir)
    torch_scores, _ = score_test_documents(
        model, load_tokenizer(trained["tokenizer"]), load_tokenized(trained["tokenizer"]), trained["data"], 10**6
    )
    expected, got = document_distribution(torch_scores), report["versions"][0]
    assert got["bytes"] == expected["bytes"] and got["tokens"] == expected["tokens"]
    for key in ("bpb", "mean", "median", "p10", "p90"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4)


def test_cli_evaluates_registered_versions_end_to_end(two_versions, mlflow_tracking, tmp_path, capsys):
    settings = mlflow_tracking.settings
    mlflow_yaml = tmp_path / "mlflow.yaml"
    mlflow_yaml.write_text(
        f"tracking_uri: {settings.tracking_uri}\nartifact_location: {settings.artifact_location}\n"
        f"experiment: {settings.experiment}\n"
    )
    data = write_jsonl(tmp_path / "data.jsonl", [{"body": t, "topic": label} for t, label in rows()])
    common = ["--workdir", str(tmp_path / "w"), "--mlflow-config", str(mlflow_yaml), "--device", "cpu"]
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "models:/clf@champion",
                "--model",
                two_versions[1],
                "--data",
                str(data),
                "--text-field",
                "body",
                "--label-field",
                "topic",
                "--output",
                str(out),
                *common,
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert [v["uri"] for v in report["versions"]] == ["models:/clf@champion", two_versions[1]]
    assert report["comparisons"][0]["verdict"] == "no significant difference"

    assert main(["evaluate", "--model", two_versions[0], *common]) == 2
    assert "--model and --data go together" in capsys.readouterr().err
    assert main(["evaluate", "--model", two_versions[0], "--data", str(tmp_path / "none.csv"), *common]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", "models:/clf@nobody", "--data", str(data), *common]) == 2
    assert "cannot be resolved" in capsys.readouterr().err
