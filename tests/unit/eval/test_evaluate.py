import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from gptcore.config import EvalConfig
from gptcore.eval.lm import evaluate_lm, generate_samples
from gptcore.fsutil import read_json
from gptcore.results import (
    load_pretrained,
    load_tokenized,
    load_tokenizer,
    read_doc_scores,
    read_split,
    read_tokens,
    token_byte_lengths,
)
from gptcore.weights import load_lm


def test_lm_evaluation_beats_unigram_and_bits_per_byte_is_consistent(trained, tmp_path):
    cfg = EvalConfig(prompts=["wave", "hill"], max_new_tokens=8)
    result = evaluate_lm(cfg, trained["pre"], trained["tokenizer"], tmp_path / "eval")
    for split in ("val", "test"):
        s = getattr(result, split)
        assert s["bpb"] < result.unigram_bpb[split]
        assert math.isclose(s["perplexity"], math.exp(s["loss"]))
        # bpb = mean nats per token * tokens / bytes / ln 2
        assert math.isclose(s["bpb"], s["loss"] * s["tokens"] / s["bytes"] / math.log(2), rel_tol=1e-9)
    assert read_json(result.metrics_path)["test"] == result.test
    samples = (tmp_path / "eval" / "samples.txt").read_text()
    assert samples.count("--- prompt") == 2 and "\nwave" in samples


def test_scored_bytes_are_the_bytes_of_the_scored_tokens(trained, tmp_path):
    result = evaluate_lm(
        EvalConfig(prompts=["x"], max_new_tokens=1, max_eval_tokens=1000),
        trained["pre"],
        trained["tokenizer"],
        tmp_path / "eval",
    )
    tokens = np.asarray(read_tokens(load_tokenized(trained["tokenizer"]), "test"))
    lengths = token_byte_lengths(load_tokenizer(trained["tokenizer"]))
    T = 32  # block_size of the `trained` fixture's model
    n = (1000 - 1) // T * T if len(tokens) >= 1000 else (len(tokens) - 1) // T * T
    targets = np.concatenate([tokens[i * T + 1 : i * T + T + 1] for i in range(n // T)])
    assert result.test["tokens"] == targets.size
    assert result.test["bytes"] == int(lengths[targets].sum())


def test_every_test_document_gets_its_own_bits_per_byte(trained, lm_evaluation):
    result = lm_evaluation
    docs = result.test["documents"]
    assert read_json(result.metrics_path)["test"]["documents"] == docs
    scores = read_doc_scores(Path(result.metrics_path).parent / docs["file"])
    split = read_split(trained["data"], "test", ["id", "text"])
    assert scores.doc_ids.tolist() == split.column("id").to_pylist()  # the whole split: it is under the cap
    assert scores.bytes.tolist() == [len(t.encode()) for t in split.column("text").to_pylist()]
    assert docs["documents"] == split.num_rows and docs["p10"] <= docs["median"] <= docs["p90"]
    assert docs["mean"] == pytest.approx(float(scores.bpb.mean()))
    # Each document starts from no context but slides its window: pooled, it lands near the stream's figure.
    assert docs["bpb"] == pytest.approx(result.test["bpb"], rel=0.1)
    assert len(docs["examples_digest"]) == 64


def test_per_document_scoring_keeps_to_the_token_cap(trained, tmp_path):
    result = evaluate_lm(
        EvalConfig(prompts=["x"], max_new_tokens=1, max_eval_tokens=2500),
        trained["pre"],
        trained["tokenizer"],
        tmp_path / "eval",
    )
    docs = result.test["documents"]  # the split: 6 documents of ~950 tokens
    assert 2 <= docs["documents"] < read_split(trained["data"], "test", ["id"]).num_rows and docs["tokens"] <= 2500
    assert read_doc_scores(tmp_path / "eval" / docs["file"]).doc_ids[0] == "test/0"  # no data_dir: positions


def test_samples_are_the_same_on_every_run(trained):
    model, _ = load_lm(load_pretrained(trained["pre"]).best_dir)
    tok = load_tokenizer(trained["tokenizer"])
    cfg = EvalConfig(prompts=["wave", "hill"], max_new_tokens=12, temperature=1.0)
    first = generate_samples(model, tok, cfg)
    assert generate_samples(model, tok, cfg) == first
    assert generate_samples(model, tok, dataclasses.replace(cfg, seed=1)) != first  # the seeds fix them, not luck
