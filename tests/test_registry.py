"""Promotion by evidence, against a real MLflow store (SQLite + local artifacts)."""

import json
from pathlib import Path

import pytest

from gptcore.errors import ConfigError
from gptcore.registry import CHALLENGER, CHAMPION, register


def fake_package(root, kind: str):
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"onnx")
    (root / "gptcore_model.json").write_text(json.dumps(
        {"kind": kind, "data_digest": "d" * 64, "tokenizer_digest": "t" * 64, "parity": {"max_abs_logit_diff": 1e-6}}))
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
    assert json.loads(client.get_model_version("lm", first.version).tags["gptcore.config"]) == {"x": 1}


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
