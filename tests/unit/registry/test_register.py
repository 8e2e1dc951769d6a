"""Promotion by evidence, against a real MLflow store (SQLite + local artifacts)."""

import json
from pathlib import Path

import numpy as np
import pytest

from gptcore.errors import ConfigError
from gptcore.layout import CHALLENGER, CHAMPION
from gptcore.registry.register import register


def fake_package(root, kind: str):
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(f"onnx of {root}".encode())  # each directory a model of its own
    (root / "gptcore_model.json").write_text(
        json.dumps(
            {
                "kind": kind,
                "data_digest": "d" * 64,
                "tokenizer_digest": "t" * 64,
                "parity": {"max_abs_logit_diff": 1e-6},
                **({"labels": ["neg", "pos"]} if kind == "classifier" else {}),
            }
        )
    )  # the pyfunc's signature names them
    return root


def eval_file(path, section: str, key: str, value: float):
    path.write_text(json.dumps({section: {key: value}}))
    return path


def test_first_version_is_champion_worse_stays_challenger_better_wins(mlflow_tracking, tmp_path):
    pkg = fake_package(tmp_path / "pkg", "lm")
    client = mlflow_tracking.client()
    first = register(pkg, eval_file(tmp_path / "e1.json", "test", "bpb", 2.0), "lm", mlflow_tracking, {"x": 1})
    assert first.promoted and first.reason == "first version"
    worse = register(pkg, eval_file(tmp_path / "e2.json", "test", "bpb", 2.5), "lm", mlflow_tracking)
    assert not worse.promoted and worse.champion_version == first.version
    assert str(client.get_model_version_by_alias("lm", CHAMPION).version) == first.version
    assert str(client.get_model_version_by_alias("lm", CHALLENGER).version) == worse.version
    better = register(pkg, eval_file(tmp_path / "e3.json", "test", "bpb", 1.5), "lm", mlflow_tracking)
    assert better.promoted
    champion = client.get_model_version_by_alias("lm", CHAMPION)
    assert str(champion.version) == better.version
    assert champion.tags["gptcore.data_digest"] == "d" * 64
    assert champion.tags["gptcore.tokenizer_digest"] == "t" * 64
    assert float(champion.tags["gptcore.metric.test_bpb"]) == 1.5


def test_a_version_reads_as_what_it_is_and_links_the_runs_that_made_it(mlflow_tracking, tmp_path):
    import dataclasses

    import mlflow.artifacts

    from gptcore.layout import PACKAGE_DIGEST_TAG
    from gptcore.registry.register import CONFIG_TAG
    from gptcore.runtime.package import package_digest
    from gptcore.tracking import stage_run

    pkg = fake_package(tmp_path / "pkg", "lm")
    config = {"model": {"n_layer": 2, "notes": "x" * 4000}}  # a config of any size stays out of the tags
    with stage_run(mlflow_tracking, "pipeline") as parent:
        inside = dataclasses.replace(mlflow_tracking, parent_run_id=parent.run_id)
        runs = {}
        for stage, tags in (
            ("pretrain", {}),
            ("evaluate_lm", {}),
            ("export_lm", {PACKAGE_DIGEST_TAG: package_digest(pkg)}),
        ):
            with stage_run(inside, stage, tags=tags) as run:
                runs[stage] = run.run_id
        result = register(pkg, eval_file(tmp_path / "e.json", "test", "bpb", 2.0), "lm", inside, config)
    client = mlflow_tracking.client()
    version = client.get_model_version("lm", result.version)
    assert version.run_id == runs["export_lm"]  # the source run: the run that wrote the package
    assert "test_bpb 2.0000" in version.description
    for stage, run_id in runs.items():
        assert f"[{stage}](#/experiments/" in version.description and run_id in version.description
    assert "[register_lm](#/experiments/" in version.description
    logged = client.search_logged_models([mlflow_tracking.experiment_id()])
    assert [(m.name, m.source_run_id) for m in logged] == [("lm", runs["export_lm"])]
    assert max(len(value) for value in version.tags.values()) < 300
    config_file = mlflow.artifacts.download_artifacts(
        run_id=version.run_id,
        artifact_path=version.tags[CONFIG_TAG],
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_tracking.settings.tracking_uri,
    )
    assert json.loads(Path(config_file).read_text()) == config


def test_registered_version_is_self_contained(mlflow_tracking, tmp_path):
    from gptcore.runtime import resolve_model_uri

    pkg = fake_package(tmp_path / "pkg", "classifier")
    reg = register(pkg, eval_file(tmp_path / "e.json", "test", "macro_f1", 0.7), "clf", mlflow_tracking)
    local = resolve_model_uri(reg.champion_uri, tracking_uri=mlflow_tracking.settings.tracking_uri)
    assert sorted(p.name for p in Path(local).iterdir()) == ["gptcore_model.json", "model.onnx"]


def test_classifier_promotes_on_higher_macro_f1(mlflow_tracking, tmp_path):
    pkg = fake_package(tmp_path / "pkg", "classifier")
    register(pkg, eval_file(tmp_path / "a.json", "test", "macro_f1", 0.6), "clf", mlflow_tracking)
    assert register(pkg, eval_file(tmp_path / "b.json", "test", "macro_f1", 0.7), "clf", mlflow_tracking).promoted
    assert not register(pkg, eval_file(tmp_path / "c.json", "test", "macro_f1", 0.65), "clf", mlflow_tracking).promoted


def test_register_needs_tracking(tmp_path):
    with pytest.raises(ConfigError, match="register"):
        register(fake_package(tmp_path / "pkg", "lm"), tmp_path / "e.json", "lm", None)


# --- the classifier's paired-bootstrap gate -----------------------------------------------


LABELS = np.random.default_rng(0).integers(0, 3, size=600)


def gated_eval(
    path: Path,
    right: float,
    seed: int,
    confidence: float = 0.7,
    digest: str = "e" * 64,
    flip_one_of: np.ndarray | None = None,
) -> Path:
    """An evaluation of a model right on a `right` share of LABELS, with its per-example predictions."""
    rng = np.random.default_rng(seed)
    y_pred = np.where(rng.random(len(LABELS)) < right, LABELS, (LABELS + 1) % 3)
    if flip_one_of is not None:  # the given predictions, one wrong example made right
        y_pred = flip_one_of.argmax(1).copy()
        y_pred[np.flatnonzero(y_pred != LABELS)[0]] = LABELS[np.flatnonzero(y_pred != LABELS)[0]]
    probs = np.full((len(LABELS), 3), (1 - confidence) / 2)
    probs[np.arange(len(LABELS)), y_pred] = confidence
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".npz"), labels=LABELS, probs=probs)
    macro_f1 = float(np.mean([np.mean(y_pred[k == LABELS] == k) for k in range(3)]))  # only its order matters
    path.write_text(
        json.dumps(
            {
                "test": {
                    "macro_f1": macro_f1,
                    "predictions": {
                        "file": path.with_suffix(".npz").name,
                        "examples": len(LABELS),
                        "examples_digest": digest,
                    },
                }
            }
        )
    )
    return path


def test_gate_promotes_only_a_significant_gain_with_no_guard_regressing(mlflow_tracking, tmp_path):
    client = mlflow_tracking.client()

    def challenge(name: str, **kwargs):  # each challenger a model of its own
        pkg = fake_package(tmp_path / name / "pkg", "classifier")
        return register(pkg, gated_eval(tmp_path / name / "eval.json", **kwargs), "clf", mlflow_tracking)

    first = challenge("first", right=0.6, seed=1)
    assert first.promoted
    better = challenge("better", right=0.8, seed=2)
    assert better.promoted, better.reason
    assert "significant" in better.reason and "macro-F1 +" in better.reason
    gate = json.loads(client.get_model_version("clf", better.version).tags["gptcore.gate"])
    assert gate["macro_f1"]["ci"][0] > 0
    assert "lost to v" in client.get_model_version("clf", first.version).tags[f"gptcore.challenge.v{better.version}"]

    equal = challenge("equal", right=0.8, seed=2)  # the same predictions again
    assert not equal.promoted and "not a significant improvement" in equal.reason
    champion_probs = np.load(tmp_path / "better" / "eval.npz")["probs"]
    tie = challenge("tie", right=0, seed=0, flip_one_of=champion_probs)  # one example more right: noise
    assert not tie.promoted and "not a significant improvement" in tie.reason
    reckless = challenge("reckless", right=0.97, seed=4, confidence=0.34)  # right, but its confidence means nothing
    assert not reckless.promoted and "calibration error rises" in reckless.reason
    overconfident = challenge("overconfident", right=0.95, seed=3, confidence=1.0)
    assert overconfident.promoted, overconfident.reason  # more right, and its certainty is earned
    other_data = challenge("other", right=1.0, seed=5, digest="f" * 64)
    assert not other_data.promoted and "other test examples" in other_data.reason
    champion = client.get_model_version_by_alias("clf", CHAMPION)
    assert str(champion.version) == overconfident.version
    assert (
        "kept against" in client.get_model_version("clf", better.version).tags[f"gptcore.challenge.v{reckless.version}"]
    )


def test_the_same_package_and_evaluation_registered_again_reuse_their_version(mlflow_tracking, tmp_path):
    """A pipeline killed inside `register` (before or after its MLflow run ended), run again, takes its
    version up: no second version, the champion stays; another evaluation is a version of its own."""
    pkg = fake_package(tmp_path / "pkg", "lm")
    evaluation = eval_file(tmp_path / "e.json", "test", "bpb", 2.0)
    first = register(pkg, evaluation, "lm", mlflow_tracking)
    again = register(pkg, evaluation, "lm", mlflow_tracking)
    assert (again.version, again.promoted, again.champion_version) == (first.version, True, first.version)
    assert "already the champion" in again.reason
    client = mlflow_tracking.client()
    assert [str(v.version) for v in client.search_model_versions("name = 'lm'")] == [first.version]
    assert register(pkg, eval_file(tmp_path / "e2.json", "test", "bpb", 2.5), "lm", mlflow_tracking).version == "2"
