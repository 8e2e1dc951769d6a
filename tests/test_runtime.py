"""The torch-free runtime: real ONNX Runtime sessions over packages exported from tiny models."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gptcore.checkpoint import load_lm
from gptcore.errors import InputError
from gptcore.runtime import load_model, load_package, score_file


@pytest.fixture(scope="module")
def lm(lm_package):
    return load_model(lm_package.package_dir, device="cpu")


@pytest.fixture(scope="module")
def clf(classifier_package):
    return load_model(classifier_package.package_dir, device="cpu")


def test_runtime_imports_no_torch():
    code = "import sys, gptcore.runtime; print(sorted({'torch', 'prefect', 'datasets', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_greedy_matches_torch_past_the_context_window(trained, lm):
    gpt, _ = load_lm(f"{trained['pre']}/best")
    prompt = lm.tokenizer.encode("wave salt ship", add_special_tokens=False).ids
    with torch.no_grad():
        ref = gpt.generate(torch.tensor([prompt]), 40, temperature=0.0)[0, len(prompt):].tolist()
    assert len(prompt) + 40 > lm.block_size  # the cache is dropped and the window re-run at least once
    assert lm.generate_ids(prompt, max_new_tokens=40, temperature=0.0, stop_at_eos=False) == ref


def test_sampling_is_reproducible_with_a_seed(lm):
    a = lm.generate("field", max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = lm.generate("field", max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == b and isinstance(a, str)


def test_left_padded_batch_equals_one_at_a_time(lm):
    prompts = ["wave", "hill field"]  # at most 10 tokens (bytes), so 10 + 8 new ones fit the 32-token context
    batch = lm.generate_batch(prompts, max_new_tokens=8, temperature=0.0)
    assert batch == [lm.generate(p, max_new_tokens=8, temperature=0.0) for p in prompts]


def test_batch_that_would_overflow_the_context_is_refused(lm):
    with pytest.raises(ValueError, match="exceeds the context"):
        lm.generate_batch(["wave"], max_new_tokens=lm.block_size)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**6}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_generation_arguments_name_the_field(lm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        lm.generate("wave", **kwargs)


def test_empty_prompt_and_oversized_batch_are_refused(lm):
    with pytest.raises(ValueError, match="prompt"):
        lm.generate("")
    with pytest.raises(ValueError, match="batch size"):
        lm.generate_batch(["a"] * 65, max_new_tokens=1)


def test_classifier_probabilities_match_torch(trained, clf):
    from gptcore.checkpoint import load_classifier

    model, _ = load_classifier(f"{trained['ft']}/best")
    texts = ["wave salt ship", "hill field plough barn wheat orchard", "x"]
    ids, mask = clf.encode(texts)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(mask)), dim=-1).numpy()
    probs = clf.predict_proba(texts)
    assert np.abs(probs - ref).max() < 1e-4
    assert np.allclose(probs.sum(axis=1), 1.0)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_score_file_writes_one_row_per_input(clf, tmp_path, suffix):
    texts = ["wave salt ship", "hill field", "tide anchor harbour", ""]
    src = tmp_path / f"in{suffix}"
    table = pa.table({"id": list(range(4)), "body": texts})
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    elif suffix == ".csv":
        import pyarrow.csv as pc

        pc.write_csv(table, src)
    else:
        pq.write_table(table, src)
    out = tmp_path / "out.parquet"
    assert score_file(clf, src, out, text_field="body", batch_size=3) == 4
    scored = pq.read_table(out)
    assert scored.num_rows == 4
    assert scored.column("id").to_pylist() == [0, 1, 2, 3]
    assert {"label", "confidence", "prob_land", "prob_sea"} <= set(scored.column_names)
    assert scored.column("label").to_pylist()[0] == "sea"


def test_score_file_missing_column_names_it_and_writes_nothing(clf, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "wave"}\n')
    with pytest.raises(InputError, match=r"in\.jsonl.*'text'.*body"):
        score_file(clf, src, tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == [src]


def test_package_missing_tokenizer_is_named(lm_package, tmp_path):
    import shutil

    broken = tmp_path / "pkg"
    shutil.copytree(lm_package.package_dir, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json"):
        load_package(broken)


def test_asking_for_cuda_gets_cuda_or_says_why(lm_package):
    """onnxruntime-gpu lists CUDA even on machines without a GPU: device='cuda' must not fall back silently."""
    from gptcore.errors import GptcoreError

    try:
        model = load_model(lm_package.package_dir, device="cuda")
    except GptcoreError as e:
        assert "CUDAExecutionProvider was asked for" in str(e) and "device='cpu'" in str(e)
    else:
        assert model.provider == "CUDAExecutionProvider"
