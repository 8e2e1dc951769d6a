"""The chat model's gate: a new version is paired with the champion on the same held-out conversations."""

import json
from pathlib import Path

from gptcore.layout import CHAMPION
from gptcore.registry.register import register
from gptcore.results import DocScores, read_doc_scores, read_eval, write_doc_scores


def evaluation_scaled(source, out_dir, factor: float):
    """A copy of a chat evaluation whose per-conversation nats are `factor` times the original's."""
    out_dir.mkdir(parents=True)
    report = read_eval(source)
    kept = report["test"]["documents"]
    scores = read_doc_scores(source.parent / kept["file"])
    write_doc_scores(
        out_dir / kept["file"], DocScores(scores.doc_ids, scores.nats * factor, scores.tokens, scores.bytes)
    )
    report["test"]["response_bpb"] *= factor
    (out_dir / source.name).write_text(json.dumps(report))
    return out_dir / source.name


def test_the_chat_gate_keeps_the_champion_against_an_equal_challenger_and_promotes_a_better_one(
    chat_trained, chat_package, mlflow_tracking, tmp_path
):
    evaluation = Path(chat_trained["report"].metrics_path)
    package = chat_package.package_dir
    client = mlflow_tracking.client()
    first = register(package, evaluation, "gptcore-chat", mlflow_tracking)
    assert first.promoted and first.metric == "test_response_bpb"
    tags = client.get_model_version("gptcore-chat", first.version).tags
    assert tags["gptcore.kind"] == "chat" and len(tags["gptcore.test_examples_digest"]) == 64
    equal = register(package, evaluation_scaled(evaluation, tmp_path / "equal", 1.0), "gptcore-chat", mlflow_tracking)
    assert not equal.promoted and "not a significant improvement" in equal.reason, equal.reason
    better = register(package, evaluation_scaled(evaluation, tmp_path / "better", 0.9), "gptcore-chat", mlflow_tracking)
    assert better.promoted and "significant" in better.reason, better.reason
    assert str(client.get_model_version_by_alias("gptcore-chat", CHAMPION).version) == better.version
