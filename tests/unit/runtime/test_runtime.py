"""The torch-free runtime in real ONNX Runtime sessions, over tiny packages built here with torch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gptcore.config import ModelConfig
from gptcore.errors import GptcoreError, InputError
from gptcore.export.classifier import export_classifier_graph
from gptcore.export.lm import export_lm_graph
from gptcore.export.package import package_meta
from gptcore.model import GPT, GPTClassifier
from gptcore.runtime import OnnxClassifier, OnnxLM, load_model, load_package, resolve_model_uri, score_file
from gptcore.runtime.batching import DecodeBatch, sample
from tests.conftest import write_input

EOT, PAD = "<|endoftext|>", "<|pad|>"
LABELS = ["sea", "land", "sky"]
SENTENCES = [
    "The ship sailed out of the harbour on the morning tide.",
    "Gulls followed the boat while the sailors hauled the anchor.",
    "A storm rolled over the sea and the waves broke on the deck.",
    "The farmer ploughed the field beside the old stone barn.",
    "Wheat grew tall in the meadow behind the orchard fence.",
    "Clouds drifted across the sky as the sun went down.",
    "Stars came out one by one over the quiet hills.",
] * 4


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def train_briefly(gpt: GPT, tokens: torch.Tensor, steps: int = 200) -> None:
    """Enough steps (~1 s) to recite the sentences: greedy output then depends on context and
    positions, where an untrained model repeats one token and would hide a misplaced window."""
    T = gpt.cfg.block_size
    opt = torch.optim.AdamW(gpt.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - T - 1, (8,), generator=gen)
        x = torch.stack([tokens[s : s + T] for s in starts])
        y = torch.stack([tokens[s + 1 : s + T + 1] for s in starts])
        _, loss = gpt(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gpt.eval()


def write_package(directory: Path, kind: str, gpt: GPT, tok, export, labels: list[str] | None = None) -> Path:
    directory.mkdir()
    export(directory / "model.onnx")
    tok.save(str(directory / "tokenizer.json"))
    model_meta = {"labels": labels or [], "model": {}, "data_digest": "d", "tokenizer_digest": "t"}  # no parity run
    (directory / "gptcore_model.json").write_text(json.dumps(package_meta(kind, gpt, tok, model_meta, {})))
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A briefly trained GPT (block_size 32) and a 3-way classifier on it, with their ONNX packages."""
    root = tmp_path_factory.mktemp("runtime")
    tok = train_tokenizer()
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_size=tok.get_vocab_size()))
    eot = tok.token_to_id(EOT)
    train_briefly(gpt, torch.tensor([i for s in SENTENCES for i in [*tok.encode(s).ids, eot]]))
    clf = GPTClassifier(gpt, len(LABELS)).eval()
    torch.nn.init.normal_(clf.head.weight, std=1.0)  # confident, distinct rows: a stricter comparison than ~uniform
    lm_dir = write_package(root / "lm", "lm", gpt, tok, lambda p: export_lm_graph(gpt, p, opset=18))
    clf_dir = write_package(
        root / "clf", "classifier", gpt, tok, lambda p: export_classifier_graph(clf, p, opset=18), LABELS
    )
    return {"tok": tok, "gpt": gpt, "clf": clf, "lm_dir": lm_dir, "clf_dir": clf_dir}


@pytest.fixture(scope="module")
def lm(built) -> OnnxLM:
    return load_model(built["lm_dir"], device="cpu", threads=2)


@pytest.fixture(scope="module")
def classifier(built) -> OnnxClassifier:
    return load_model(built["clf_dir"], device="cpu", threads=2)


def test_load_model_picks_the_class_by_kind(lm, classifier):
    assert isinstance(lm, OnnxLM) and isinstance(classifier, OnnxClassifier)
    assert lm.provider == classifier.provider == "CPUExecutionProvider"
    assert classifier.labels == LABELS


def test_logits_match_torch_with_and_without_cache(built, lm):
    ids = np.array([built["tok"].encode(SENTENCES[0]).ids[:12]])
    with torch.no_grad():
        ref = built["gpt"](torch.from_numpy(ids))[0][..., : built["gpt"].cfg.vocab_size].numpy()
    assert np.abs(lm.forward_logits(ids) - ref).max() < 1e-4
    batch = DecodeBatch(lm, max_rows=1)
    batch.reserve(1, 12)
    assert np.abs(batch.run(0, ids[:, :8], np.arange(8)[None]) - ref[:, 7]).max() < 1e-4
    for t in range(8, 12):  # then one token at a time, written into the cache in place
        assert np.abs(batch.run(0, ids[:, t : t + 1], np.array([[t]])) - ref[:, t]).max() < 1e-4


def test_greedy_matches_torch_past_the_context_window(built, lm):
    prompt = built["tok"].encode("The ship sailed out").ids[:5]
    assert len(prompt) == 5 and len(prompt) + 40 > lm.block_size  # the cache is dropped and re-run at least once
    with torch.no_grad():
        ref = built["gpt"].generate(torch.tensor([prompt]), 40, temperature=0.0)[0, len(prompt) :].tolist()
    assert lm.generate_ids(prompt, max_new_tokens=40, temperature=0.0, stop_at_eos=False) == ref


def test_sampling_is_reproducible_with_a_seed(lm):
    kwargs = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 20, "top_p": 0.9}
    first = lm.generate("The farmer", seed=7, **kwargs)
    assert isinstance(first, str) and first == lm.generate("The farmer", seed=7, **kwargs)
    # top_k=1 leaves only the argmax to draw, whatever the seed
    greedy = lm.generate("The farmer", max_new_tokens=10, temperature=0.0)
    assert lm.generate("The farmer", max_new_tokens=10, temperature=0.7, top_k=1, seed=3) == greedy


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = np.log(np.tile([[0.5, 0.3, 0.15, 0.05]], (400, 1)))
    rng = np.random.default_rng(0)
    assert set(sample(logits, 1.0, None, 0.5, rng)) == {0}
    assert set(sample(logits, 1.0, None, 0.6, rng)) == {0, 1}
    assert set(sample(logits, 1.0, 2, None, rng)) == {0, 1}
    assert set(sample(logits, 1.0, None, 1.0, rng)) == {0, 1, 2, 3}


def test_left_padded_batch_equals_one_at_a_time(built, lm):
    prompts = ["Gulls", "A storm rolled over the sea and"]
    width = max(len(built["tok"].encode(p).ids) for p in prompts)
    assert width > len(built["tok"].encode(prompts[0]).ids)  # the short prompt really is padded
    for n in (lm.block_size - width + 1, 40):  # as many new tokens as fit; then past the window, which slides
        batch = lm.generate_batch(prompts, max_new_tokens=n, temperature=0.0)
        assert batch == [lm.generate(p, max_new_tokens=n, temperature=0.0) for p in prompts]


def test_batched_greedy_matches_torch_past_the_window(built, lm):
    """Rows of one length (no padding) through torch's own batched generate: the window slides alike."""
    rows = [built["tok"].encode(s).ids[:6] for s in SENTENCES[:3]]
    with torch.no_grad():
        ref = built["gpt"].generate(torch.tensor(rows), 40, temperature=0.0)[:, 6:].tolist()
    assert lm.generate_batch_ids(rows, max_new_tokens=40, temperature=0.0, stop_at_eos=False) == ref


def test_streamed_pieces_join_to_the_generated_text(lm):
    pieces = list(lm.stream("The ship", max_new_tokens=30, temperature=0.0))
    assert len(pieces) > 1 and "".join(pieces) == lm.generate("The ship", max_new_tokens=30, temperature=0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4097}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_generation_arguments_name_the_field(lm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        lm.generate("The ship", **kwargs)
    with pytest.raises(ValueError, match=field):
        lm.generate_batch(["The ship"], **kwargs)


def test_bad_prompts_and_batches_are_refused(lm):
    with pytest.raises(ValueError, match="prompt"):
        lm.generate("")
    with pytest.raises(ValueError, match="prompt"):
        lm.generate_ids([], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt.*vocabulary"):
        lm.generate_ids([lm.vocab_size], max_new_tokens=1)
    with pytest.raises(ValueError, match="batch size"):
        lm.generate_batch(["a"] * 65, max_new_tokens=1)


def test_classifier_probabilities_match_torch(built, classifier):
    texts = ["The ship sailed", "Wheat grew tall in the meadow behind the orchard fence.", "x", ""]
    ids, mask = classifier.encode(texts)
    assert mask[:, 0].all() and (ids[mask == 0] == classifier.pad_id).all()  # right-padded; "" became one token
    with torch.no_grad():
        ref = torch.softmax(built["clf"](torch.from_numpy(ids), torch.from_numpy(mask)).double(), dim=-1).numpy()
    probs = classifier.predict_proba(texts, batch_size=3)  # two batches, padded to different widths
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_classify_reports_label_confidence_and_all_probabilities(classifier):
    long_text = " ".join(SENTENCES)  # far past block_size: cut to its first block_size tokens
    results = classifier.classify(["", "Clouds drifted across the sky", long_text])
    for r in results:
        assert r["label"] in LABELS and set(r["probabilities"]) == set(LABELS)
        assert r["confidence"] == max(r["probabilities"].values()) == r["probabilities"][r["label"]]
    assert classifier.predict_proba([]).shape == (0, 3)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_score_file_writes_one_row_per_input(classifier, tmp_path, suffix):
    texts = ["The ship sailed", "Wheat grew tall", "Stars came out", "", "007"]
    src = tmp_path / f"in{suffix}"
    write_input(src, pa.table({"id": list(range(5)), "body": texts, "label": ["sea"] * 5}))
    out = tmp_path / "out.parquet"
    assert score_file(classifier, src, out, text_field="body", batch_size=2).rows == 5
    scored = pq.read_table(out)
    assert scored.column("id").to_pylist() == list(range(5))
    assert scored.column("body").to_pylist() == texts  # CSV keeps "007" as text
    assert scored.column("input_label").to_pylist() == ["sea"] * 5  # set aside, not overwritten
    assert scored.schema.field("label").type == pa.string()
    probs = np.stack([scored.column(f"prob_{label}").to_numpy() for label in LABELS], axis=1)
    np.testing.assert_allclose(probs, classifier.predict_proba(texts), atol=1e-9)
    assert scored.column("label").to_pylist() == [LABELS[k] for k in probs.argmax(axis=1)]
    np.testing.assert_allclose(scored.column("confidence").to_numpy(), probs.max(axis=1))


def test_score_file_missing_column_names_it_and_writes_nothing(classifier, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "The ship"}\n')
    with pytest.raises(InputError, match=r"in\.jsonl.*'text'.*body"):
        score_file(classifier, src, tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == [src]


def test_score_file_refuses_null_text_and_unknown_types(classifier, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "The ship"}\n{"text": null}\n')
    with pytest.raises(InputError, match=r"in\.jsonl.*row 1"):
        score_file(classifier, src, tmp_path / "out.parquet")
    with pytest.raises(InputError, match=r"in\.txt.*\.jsonl"):
        score_file(classifier, tmp_path / "in.txt", tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == [src]


def test_package_missing_tokenizer_is_named(built, tmp_path):
    broken = shutil.copytree(built["lm_dir"], tmp_path / "pkg")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json"):
        load_package(broken)


def test_package_of_unknown_format_or_kind_is_refused(built, tmp_path):
    pkg = shutil.copytree(built["lm_dir"], tmp_path / "pkg")
    meta = json.loads((pkg / "gptcore_model.json").read_text())
    for change, field in (
        ({"format_version": 4}, "format_version"),
        ({"kind": "vision"}, "kind"),
        ({"kind": "classifier", "labels": []}, "labels"),
        ({"variants": {"int8": {"file": "../model.onnx"}}}, "variants"),
        ({"variants": {"int8": {"file": "model.int8.onnx"}}}, "lacks fp32"),
        ({"variants": {"fp32": {"file": "model.onnx"}, "int8": {"file": "model.int8.onnx"}}}, "model.int8.onnx"),
    ):
        (pkg / "gptcore_model.json").write_text(json.dumps(meta | change))
        with pytest.raises(InputError, match=field):
            load_package(pkg)
    with pytest.raises(InputError, match="no such"):
        resolve_model_uri(tmp_path / "nowhere")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store, made the default through the environment only (undone after the test)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_resolve_registry_and_run_uris(built, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.create_experiment("runtime", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(built["lm_dir"]), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tiny-lm")
    version = client.create_model_version("tiny-lm", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("tiny-lm", "champion", version.version)

    expected = sorted(p.name for p in built["lm_dir"].iterdir())
    for uri in ("models:/tiny-lm@champion", f"models:/tiny-lm/{version.version}", f"runs:/{run.info.run_id}/model"):
        assert sorted(p.name for p in resolve_model_uri(uri).iterdir()) == expected, uri
    assert isinstance(load_model("models:/tiny-lm@champion", device="cpu"), OnnxLM)
    with pytest.raises(InputError, match="tiny-lm@nobody"):
        resolve_model_uri("models:/tiny-lm@nobody", tracking_uri=mlflow_store)


def test_asking_for_cuda_gets_cuda_or_says_why(built):
    """onnxruntime-gpu lists CUDA even where no GPU is: device='cuda' must not fall back to CPU silently."""
    try:
        model = load_model(built["lm_dir"], device="cuda")
    except GptcoreError as e:
        assert "CUDAExecutionProvider was asked for" in str(e) and "device='cpu'" in str(e)
    else:
        assert model.provider == "CUDAExecutionProvider"
        prompt = [1, 2, 3, 4, 5]
        cpu = load_model(built["lm_dir"], device="cpu")
        assert model.generate_ids(prompt, 8, temperature=0.0) == cpu.generate_ids(prompt, 8, temperature=0.0)
