"""Integrated-gradients explanations: the integral is complete, follows the words that decide the
class, renders safely, comes with evaluation, and explains a registered version by its URI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcore.cli import main
from gptcore.data.passages import make_passages
from gptcore.errors import InputError
from gptcore.eval.classifier import evaluate_classifier
from gptcore.eval.explain import class_sample, explain, explain_passages, integrated_gradients
from gptcore.eval.explanation import Explanation, render_html
from gptcore.layout import CHECKPOINT_TAG, PAD
from gptcore.registry.register import register
from gptcore.results import load_finetuned, load_tokenizer
from gptcore.runtime import load_model
from gptcore.weights import load_classifier
from tests.conftest import WORDS
from tests.unit.registry.test_register import eval_file, fake_package

pytestmark = pytest.mark.usefixtures("restore_gptcore_logger")  # main() sets up console logging


@pytest.fixture(scope="module")
def classifier(trained):
    model, meta = load_classifier(load_finetuned(trained["ft"]).best_dir)
    return model, meta, load_tokenizer(trained["tokenizer"])


def test_attributions_sum_to_the_logit_difference(classifier, trained):
    model, meta, tok = classifier
    test, _ = make_passages(trained["data"], "test", "label", tok, meta["passage_tokens"], meta["labels"])
    picks = class_sample(test.labels, 6)
    seqs = [test.ids[i][: 8 + 3 * j] for j, i in enumerate(picks)]  # ragged: padding must not leak in
    explanations = explain_passages(model, tok, seqs, meta["labels"], test.labels[picks])
    diffs = [ex.logit - ex.baseline_logit for ex in explanations]
    assert max(map(abs, diffs)) > 1  # a real difference for the attributions to account for
    for ex, s, diff in zip(explanations, seqs, diffs):
        assert len(ex.tokens) == len(ex.attributions) == len(s)
        assert ex.completeness_gap <= 0.01 * max(abs(diff), 1), ex
    # Towards the other class too, and each passage alone gives what it gave in the batch.
    other = 1 - torch.tensor([ex.predicted for ex in explanations])
    ig = integrated_gradients(model, seqs, tok.token_to_id(PAD), other)
    assert torch.equal(ig.targets, other)
    diff = (ig.logits - ig.baseline_logits).gather(1, other[:, None])[:, 0]
    assert torch.all((ig.attributions.sum(1) - diff).abs() <= 0.01 * diff.abs().clamp(min=1))
    (alone,) = explain_passages(model, tok, seqs[:1], meta["labels"])
    assert np.allclose(alone.attributions, explanations[0].attributions, atol=1e-3)


def test_equal_steps_alone_miss_a_jump_that_refinement_finds(classifier, trained):
    model, meta, tok = classifier
    test, _ = make_passages(trained["data"], "test", "label", tok, meta["passage_tokens"], meta["labels"])
    seqs = [test.ids[i] for i in class_sample(test.labels, 12)]
    coarse = integrated_gradients(model, seqs, tok.token_to_id(PAD), steps=16, refine=0)
    fine = integrated_gradients(model, seqs, tok.token_to_id(PAD), steps=16)

    def gaps(ig):
        diff = (ig.logits - ig.baseline_logits).gather(1, ig.targets[:, None])[:, 0]
        return (ig.attributions.sum(1) - diff).abs() / diff.abs().clamp(min=1)

    assert gaps(coarse).max() > 0.1 and gaps(fine).max() <= 0.01  # this tiny model's logit flips within ~1e-3 of alpha
    assert torch.all(coarse.points == 17) and fine.points.max() > 17


def test_words_of_a_topic_carry_its_class(classifier):
    model, meta, tok = classifier
    words = [w for pair in zip(WORDS["sea"][:6], WORDS["land"][:6]) for w in pair]  # alternate: "wave hill salt ..."
    enc = tok.encode(" ".join(words), add_special_tokens=False)
    assert max(enc.word_ids) == len(words) - 1
    topic = np.array([w in WORDS["sea"] for w in words])
    for target in ("sea", "land"):
        ig = integrated_gradients(model, [enc.ids], tok.token_to_id(PAD), torch.tensor([meta["labels"].index(target)]))
        per_word = np.bincount(enc.word_ids, weights=ig.attributions[0].numpy(), minlength=len(words))
        towards, against = (
            (per_word[topic], per_word[~topic]) if target == "sea" else (per_word[~topic], per_word[topic])
        )
        assert towards.mean() > against.mean(), (target, per_word)


def test_class_sample_is_fixed_and_spread_over_classes():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 40)
    picks = class_sample(labels, 12)
    assert np.array_equal(picks, class_sample(labels, 12))
    assert np.bincount(labels[picks]).tolist() == [5, 3, 4]  # class 1 has only 3; the rest share its share
    assert len(set(picks.tolist())) == 12
    assert len(class_sample(labels[:2], 12)) == 2


def test_html_escapes_tokens_and_labels():
    ex = Explanation(
        tokens=["<script>", " & ", '"x"'],
        attributions=np.array([1.0, -0.5, 0.0]),
        probs=np.array([0.25, 0.75]),
        baseline_probs=np.array([0.5, 0.5]),
        classes=["a<b", "c&d"],
        target=1,
        logit=2.0,
        baseline_logit=1.5,
        points=8,
        label=0,
        doc_id="doc<1>",
    )
    page = render_html([ex], "title <i>")
    assert "<script>" not in page and "&lt;script&gt;" in page and " &amp; " in page and "&quot;x&quot;" in page
    assert "true <b>a&lt;b</b>" in page and "predicted <b>c&amp;d</b> (p = 0.750)" in page and "wrong" in page
    assert "doc&lt;1&gt;" in page and "title &lt;i&gt;" in page
    assert "rgba(220, 38, 38, 0.850)" in page and "rgba(37, 99, 235, 0.425)" in page  # signed, per-passage scale


def test_evaluation_writes_and_logs_the_attribution_page(trained, mlflow_tracking, tmp_path):
    result = evaluate_classifier(
        trained["ft"], trained["data"], trained["tokenizer"], tmp_path / "eval", mlflow_tracking
    )
    page = Path(result.attributions_path).read_text(encoding="utf-8")
    assert page.count('class="passage"') == 12 and "true <b>sea</b>" in page and "true <b>land</b>" in page
    client = mlflow_tracking.client()
    (run,) = client.search_runs([mlflow_tracking.experiment_id()], "tags.`gptcore.stage` = 'evaluate_classifier'")
    assert "attributions.html" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.data.metrics["explain/completeness_gap_max"] < 0.5


def test_registered_version_keeps_its_checkpoint_and_explains_by_uri(
    trained, classifier_package, mlflow_tracking, tmp_path, capsys
):
    evaluation = evaluate_classifier(trained["ft"], trained["data"], trained["tokenizer"], tmp_path / "eval")
    reg = register(classifier_package.package_dir, evaluation.metrics_path, "clf", mlflow_tracking)
    client = mlflow_tracking.client()
    version = client.get_model_version("clf", reg.version)
    kept = version.tags[CHECKPOINT_TAG]  # in the folder of this registration
    assert kept.startswith("registrations/") and kept.endswith("/checkpoint")
    assert sorted(a.path.removeprefix(f"{kept}/") for a in client.list_artifacts(version.run_id, kept)) == [
        "model.json",
        "model.safetensors",
        "tokenizer.json",
    ]

    settings = tmp_path / "mlflow.yaml"
    settings.write_text(f"tracking_uri: {mlflow_tracking.settings.tracking_uri}\n")
    html = tmp_path / "one.html"
    args = ["--workdir", str(tmp_path / "w"), "--mlflow-config", str(settings)]
    text = "the harbour <b>gull</b> and the barn"
    assert (
        main(
            ["explain", "--model", "models:/clf@champion", "--text", text, "--steps", "16", "--html", str(html), *args]
        )
        == 0
    )
    out = capsys.readouterr().out
    served = load_model("models:/clf@champion", tracking_uri=mlflow_tracking.settings.tracking_uri).classify([text])[0]
    assert out.startswith(
        f"predicted: {served['label']} (p = {served['confidence']:.3f})"
    )  # the torch twin of the ONNX graph
    assert "integrated gradients" in out and "' barn'" in out
    assert "&lt;" in html.read_text(encoding="utf-8")  # the token "<" (or "<b"), escaped
    # The same checkpoint from the version number and from the local directory give the same answer.
    by_number = explain(f"models:/clf/{reg.version}", "hill barn", mlflow_tracking.settings.tracking_uri)
    local = explain(
        load_finetuned(trained["ft"]).best_dir, "hill barn", tokenizer=trained["tokenizer"] / "tokenizer.json"
    )
    assert by_number.classes[by_number.predicted] == "land"
    assert np.allclose(by_number.attributions, local.attributions, atol=1e-5)


def test_explain_says_what_is_wrong(trained, mlflow_tracking, tmp_path, capsys):
    register(
        fake_package(tmp_path / "lm", "lm"), eval_file(tmp_path / "e.json", "test", "bpb", 2.0), "lm", mlflow_tracking
    )
    register(
        fake_package(tmp_path / "clf", "classifier"),
        eval_file(tmp_path / "f.json", "test", "macro_f1", 0.5),
        "bare",
        mlflow_tracking,
    )
    settings = tmp_path / "mlflow.yaml"
    settings.write_text(f"tracking_uri: {mlflow_tracking.settings.tracking_uri}\n")
    common = ["--workdir", str(tmp_path / "w"), "--mlflow-config", str(settings)]
    for model, text, expected in [
        ("models:/lm@champion", "x", "is a 'lm' model; explanations need a classifier"),
        ("models:/bare/1", "x", "has no torch checkpoint"),
        ("models:/bare@champion", "  ", "the text is empty"),
        ("models:/nothing@champion", "x", "cannot be resolved"),
        (str(tmp_path / "clf"), "x", "no model description here"),
    ]:
        assert main(["explain", "--model", model, "--text", text, *common]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    with pytest.raises(InputError, match="not the tokenizer"):
        other = tmp_path / "tokenizer.json"
        other.write_text((trained["tokenizer"] / "tokenizer.json").read_text() + " ")
        explain(load_finetuned(trained["ft"]).best_dir, "x", tokenizer=other)


def test_register_refuses_a_checkpoint_changed_since_export_and_skips_a_gone_one(mlflow_tracking, tmp_path):
    pkg = fake_package(tmp_path / "pkg", "classifier")
    meta = json.loads((pkg / "gptcore_model.json").read_text())
    ckpt = tmp_path / "best"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"retrained")
    (pkg / "gptcore_model.json").write_text(
        json.dumps({**meta, "checkpoint": {"dir": str(ckpt), "weights_sha256": "0" * 64}})
    )
    with pytest.raises(InputError, match="weights changed since the package was exported"):
        register(pkg, eval_file(tmp_path / "e.json", "test", "macro_f1", 0.5), "clf", mlflow_tracking)
    (ckpt / "model.safetensors").unlink()
    reg = register(pkg, eval_file(tmp_path / "e.json", "test", "macro_f1", 0.5), "clf", mlflow_tracking)
    assert CHECKPOINT_TAG not in mlflow_tracking.client().get_model_version("clf", reg.version).tags
