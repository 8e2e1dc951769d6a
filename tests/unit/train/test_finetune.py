import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gptcore.config import FinetuneConfig
from gptcore.data.passages import make_passages
from gptcore.errors import InputError
from gptcore.eval.classifier import evaluate_classifier
from gptcore.results import load_tokenizer
from gptcore.train.finetune import balanced_class_weights, classification_loss, finetune


def ft_cfg(**overrides) -> FinetuneConfig:
    base = FinetuneConfig(
        label_field="label",
        passage_tokens=24,
        max_steps=60,
        batch_size=16,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_interval=20,
        eval_batches=4,
        log_interval=20,
        checkpoint_interval=60,
        device="cpu",
    )
    return dataclasses.replace(base, **overrides)


def test_passages_come_only_from_their_split(small_corpus):
    tok = load_tokenizer(small_corpus["tokenizer"])
    train, labels = make_passages(small_corpus["data"], "train", "label", tok, 24, None)
    test, _ = make_passages(small_corpus["data"], "test", "label", tok, 24, labels)
    test_ids = set(pq.read_table(small_corpus["data"] / "test.parquet").column("id").to_pylist())
    assert labels == ["land", "sea"]
    assert set(train.doc_ids).isdisjoint(test_ids)
    assert set(test.doc_ids) <= test_ids
    assert all(1 <= len(p) <= 24 for p in train.ids)


def test_wrong_label_column_names_field_and_file(small_corpus, pretrained, tmp_path):
    with pytest.raises(InputError, match=r"train\.parquet.*'genre'"):
        finetune(
            ft_cfg(label_field="genre"), pretrained, small_corpus["data"], small_corpus["tokenizer"], tmp_path / "ft"
        )
    assert not (tmp_path / "ft").exists()


def test_finetune_beats_majority_and_early_stopping_keeps_best(small_corpus, pretrained, tmp_path):
    result = finetune(ft_cfg(), pretrained, small_corpus["data"], small_corpus["tokenizer"], tmp_path / "ft")
    assert result.labels == ["land", "sea"]
    assert result.best_val_macro_f1 > 0.8  # the two topics share no words
    report = evaluate_classifier(tmp_path / "ft", small_corpus["data"], small_corpus["tokenizer"], tmp_path / "eval")
    assert report.test["macro_f1"] > report.majority["macro_f1"]
    assert report.test["accuracy"] > report.majority["accuracy"]
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    ci = report.test["ci"]
    for name in ("accuracy", "macro_f1", "ece"):
        assert ci[name][0] <= report.test[name] <= ci[name][1]
    assert ci["macro_f1"][0] >= 0 and ci["macro_f1"][1] <= 1 and set(ci["per_class"]) == set(report.test["per_class"])


def test_balanced_class_weights_make_every_class_weigh_the_same():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    weights = balanced_class_weights(labels, 3)
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert [weights[k] * (labels == k).sum() for k in range(3)] == pytest.approx([10 / 3] * 3)

    class Fixed(torch.nn.Module):  # a "model" whose logits are its input
        def forward(self, ids, mask):
            return ids.float()

    logits, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.as_tensor(labels)
    weighted = classification_loss(Fixed(), (logits, None, y), weight=torch.tensor(weights, dtype=torch.float32))
    per_example = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = torch.tensor(weights, dtype=torch.float32)[y]
    assert weighted.item() == pytest.approx(((w * per_example).sum() / w.sum()).item(), rel=1e-6)


def test_class_weights_are_used_and_logged(small_corpus, pretrained, tmp_path, caplog):
    caplog.set_level("INFO", logger="gptcore")
    result = finetune(
        ft_cfg(class_weights=True, max_steps=20),
        pretrained,
        small_corpus["data"],
        small_corpus["tokenizer"],
        tmp_path / "ft",
    )
    assert result.steps == 20
    assert any("class weights {'land'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_users_file_with_integer_labels_keeps_its_class_names(fmt, small_corpus, pretrained, tmp_path):
    """A labelled CSV or Parquet file as users have them: integer labels, classes in numeric order."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from gptcore.config import IngestConfig
    from gptcore.data.ingest import ingest

    table = pq.read_table(small_corpus["data"] / "train.parquet", columns=["text", "label"])
    codes = pa.array([10 if label == "land" else 2 for label in table.column("label").to_pylist()], pa.int64())
    users = pa.table({"text": table.column("text"), "label": codes})
    source = tmp_path / f"labelled.{fmt}"
    pacsv.write_csv(users, source) if fmt == "csv" else pq.write_table(users, source)
    ingest(
        IngestConfig(sources=[str(source)], metadata_fields=["label"], val_fraction=0.2, test_fraction=0.2),
        tmp_path / "data",
    )
    result = finetune(ft_cfg(max_steps=40), pretrained, tmp_path / "data", small_corpus["tokenizer"], tmp_path / "ft")
    assert result.labels == ["2", "10"]  # numeric order, not "10" < "2"
    report = evaluate_classifier(tmp_path / "ft", tmp_path / "data", small_corpus["tokenizer"], tmp_path / "eval")
    assert report.test["labels"] == ["2", "10"] and report.test["macro_f1"] > report.majority["macro_f1"]
