"""The language model's promotion gate: paired bootstrap over per-document bits per byte, in a real MLflow store."""

import json
import math
from pathlib import Path

import numpy as np

from gptcore.config import RegistryConfig
from gptcore.layout import CHAMPION
from gptcore.registry.register import register
from gptcore.results import DocScores, write_doc_scores
from tests.conftest import repackaged
from tests.unit.registry.test_register import eval_file, fake_package

RNG = np.random.default_rng(0)
DOC_IDS = np.array([f"test/{i}" for i in range(300)])
BYTES = RNG.integers(200, 2000, size=300)
CHAMPION_BPB = RNG.normal(2.0, 0.3, size=300)


def lm_eval(path: Path, doc_bpb: np.ndarray, digest: str = "e" * 64, doc_ids: np.ndarray = DOC_IDS) -> Path:
    """An LM evaluation whose test documents score `doc_bpb` bits per byte each, kept per document."""
    nats = doc_bpb * BYTES * math.log(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_doc_scores(path.with_suffix(".npz"), DocScores(doc_ids, nats, BYTES // 4, BYTES))
    bpb = float(nats.sum() / math.log(2) / BYTES.sum())
    path.write_text(
        json.dumps(
            {
                "test": {
                    "bpb": bpb,
                    "documents": {
                        "file": path.with_suffix(".npz").name,
                        "documents": len(doc_ids),
                        "examples_digest": digest,
                    },
                }
            }
        )
    )
    return path


def test_lm_gate_promotes_only_a_significant_bpb_reduction(mlflow_tracking, tmp_path):
    client = mlflow_tracking.client()

    def challenge(name: str, doc_bpb: np.ndarray, **kwargs):  # each challenger a model of its own
        pkg = fake_package(tmp_path / name / "pkg", "lm")
        return register(pkg, lm_eval(tmp_path / name / "eval.json", doc_bpb, **kwargs), "lm", mlflow_tracking)

    first = challenge("first", CHAMPION_BPB)
    assert first.promoted and first.reason == "first version"
    better = challenge("better", CHAMPION_BPB - 0.05)
    assert better.promoted and "significant" in better.reason and "reduction +0.05" in better.reason, better.reason
    gate = json.loads(client.get_model_version("lm", better.version).tags["gptcore.gate"])
    assert gate["reduction"]["ci"][0] > 0 and gate["documents"] == 300
    assert "lost to v" in client.get_model_version("lm", first.version).tags[f"gptcore.challenge.v{better.version}"]

    champion_bpb = CHAMPION_BPB - 0.05
    equal = challenge("equal", champion_bpb)  # the same per-document figures again
    assert not equal.promoted and "not a significant improvement" in equal.reason
    assert "reduction +0.0000" in equal.reason
    noise = challenge("noise", champion_bpb + RNG.normal(0, 0.05, size=300))  # the same model, other luck
    assert not noise.promoted and "not a significant improvement" in noise.reason
    one_doc = champion_bpb.copy()
    one_doc[0] -= 0.5  # one document a little better: noise, however the pooled figure moves
    tie = challenge("tie", one_doc)
    assert tie.value < better.value and not tie.promoted and "not a significant improvement" in tie.reason
    other = challenge("other", champion_bpb - 0.5, digest="f" * 64)
    assert not other.promoted and "other test examples" in other.reason
    assert str(client.get_model_version_by_alias("lm", CHAMPION).version) == better.version
    assert "kept against" in client.get_model_version("lm", better.version).tags[f"gptcore.challenge.v{tie.version}"]


def test_lm_gate_threshold_and_fallback_to_the_stored_metric(mlflow_tracking, tmp_path):
    pkg = fake_package(tmp_path / "pkg", "lm")
    register(pkg, lm_eval(tmp_path / "a" / "eval.json", CHAMPION_BPB), "lm", mlflow_tracking)
    strict = RegistryConfig(lm_min_improvement=0.1)
    small_gain = register(
        pkg, lm_eval(tmp_path / "b" / "eval.json", CHAMPION_BPB - 0.05), "lm", mlflow_tracking, gate=strict
    )
    assert not small_gain.promoted and "does not lie above the required improvement 0.1" in small_gain.reason
    # a champion registered with no per-document figures: the stored test bpb decides
    register(pkg, eval_file(tmp_path / "c.json", "test", "bpb", 1.0), "other-lm", mlflow_tracking)
    worse = register(pkg, lm_eval(tmp_path / "d" / "eval.json", CHAMPION_BPB), "other-lm", mlflow_tracking)
    assert not worse.promoted and "does not beat" in worse.reason


def test_evaluation_stage_output_feeds_the_gate(lm_evaluation, lm_package, mlflow_tracking, tmp_path):
    result = lm_evaluation
    first = register(lm_package.package_dir, result.metrics_path, "lm", mlflow_tracking)
    # the same model in another package (one more file): a challenger of its own, equal on every document
    again = register(repackaged(lm_package.package_dir, tmp_path / "other"), result.metrics_path, "lm", mlflow_tracking)
    assert first.promoted and not again.promoted
    assert "reduction +0.0000" in again.reason and f"{result.test['documents']['documents']} documents" in again.reason
    version = mlflow_tracking.client().get_model_version("lm", again.version)
    assert version.tags["gptcore.test_examples_digest"] == result.test["documents"]["examples_digest"]
