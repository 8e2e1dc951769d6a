import math

import numpy as np

from gptcore.config import EvalConfig
from gptcore.data.shards import token_byte_lengths
from gptcore.evaluate import evaluate_lm
from gptcore.fsutil import read_json
from gptcore.tokenizer import load_tokenized, load_tokenizer, read_tokens


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
    result = evaluate_lm(EvalConfig(prompts=["x"], max_new_tokens=1, max_eval_tokens=1000), trained["pre"],
                         trained["tokenizer"], tmp_path / "eval")
    tokens = np.asarray(read_tokens(load_tokenized(trained["tokenizer"]), "test"))
    lengths = token_byte_lengths(load_tokenizer(trained["tokenizer"]))
    T = 32  # block_size of the `trained` fixture's model
    n = (1000 - 1) // T * T if len(tokens) >= 1000 else (len(tokens) - 1) // T * T
    targets = np.concatenate([tokens[i * T + 1 : i * T + T + 1] for i in range(n // T)])
    assert result.test["tokens"] == targets.size
    assert result.test["bytes"] == int(lengths[targets].sum())
