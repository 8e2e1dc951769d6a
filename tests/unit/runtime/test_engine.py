"""The serving engine over real ONNX Runtime sessions: requests of every length decoding in one
batch give, token for token, what each gives alone; cancellation, bounds and failures."""

import numpy as np
import pytest
import torch

from gptcore.config import ModelConfig
from gptcore.export.lm import export_lm_graph
from gptcore.model import GPT
from gptcore.runtime import load_model
from gptcore.runtime.batching import DecodeBatch, Sequence
from gptcore.runtime.engine import Engine, EngineFull, EngineLimits
from tests.unit.runtime.test_runtime import EOT, SENTENCES, train_briefly, train_tokenizer, write_package


@pytest.fixture(scope="module", params=["learned", "rope"])
def lm(request, tmp_path_factory):
    """A briefly trained GPT (block_size 32) with learned or rotary positions, as an ONNX package."""
    tok = train_tokenizer()
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    gpt = GPT(ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, position=request.param))
    train_briefly(gpt, torch.tensor([i for s in SENTENCES for i in [*tok.encode(s).ids, tok.token_to_id(EOT)]]))
    root = tmp_path_factory.mktemp(f"engine-{request.param}")
    package = write_package(root / "lm", "lm", gpt, tok, lambda p: export_lm_graph(gpt, p, opset=18))
    return load_model(package, device="cpu", threads=2)


class Steps:
    """An engine observer that keeps each step's figures."""

    def __init__(self):
        self.steps = []

    def first_token(self, model, seconds):
        pass

    def token_gap(self, model, seconds):
        pass

    def step(self, model, tokens, running, waiting, kv_reserved, kv_tokens):
        self.steps.append({"tokens": tokens, "running": running, "kv_reserved": kv_reserved})


def mixed_requests(lm, n: int = 10) -> list[tuple[list[int], int]]:
    """Prompts of 1 to 45 tokens (past the 32-token context: cut to its window) and 3 to 40 new
    tokens (past the context: the window slides)."""
    rng = np.random.default_rng(0)
    text = " ".join(SENTENCES)
    ids = lm.encode(text)
    lengths = [1, 45, 7, 20, 3, 31, 12, 2, 26, 9][:n]
    return [(ids[int(rng.integers(0, 50)) :][:length], int(rng.integers(3, 41))) for length in lengths]


def test_concurrent_mix_is_token_for_token_sequential_greedy(lm):
    requests = mixed_requests(lm)
    alone = [lm.generate_ids(p, n, temperature=0.0, stop_at_eos=False) for p, n in requests]
    watch = Steps()
    # small chunks and few rows: prompts are written over several steps while others decode, and requests wait
    engine = Engine(lm, EngineLimits(max_running=6, prefill_chunk=8), watch)
    generations = [engine.submit(p, n, temperature=0.0, stop_at_eos=False) for p, n in requests]
    together = [list(g) for g in generations]
    engine.close()
    assert together == alone
    assert max(s["tokens"] for s in watch.steps) == 6 and all(g.finish_reason == "length" for g in generations)


def test_seeded_sampling_in_a_batch_matches_alone(lm):
    requests = mixed_requests(lm, 4)
    kwargs = {"temperature": 1.0, "top_k": 20}
    alone = [lm.generate_ids(p, n, seed=i, **kwargs) for i, (p, n) in enumerate(requests)]
    engine = Engine(lm)
    generations = [engine.submit(p, n, seed=i, **kwargs) for i, (p, n) in enumerate(requests)]
    assert [list(g) for g in generations] == alone
    engine.close()


def test_cancelled_request_frees_its_row_and_the_batch_goes_on(lm):
    engine = Engine(lm, EngineLimits(max_running=1))
    long = engine.submit([1, 2, 3], 200, temperature=0.0, stop_at_eos=False)
    tokens = iter(long)
    next(tokens), next(tokens)
    short = engine.submit([4, 5], 5, temperature=0.0, stop_at_eos=False)  # waits: the one row is taken
    long.cancel()
    assert len(list(short)) == 5  # it ran once the cancelled one left
    assert long.finish_reason == "cancelled" and len(list(tokens)) < 198
    engine.close()
    engine.thread.join(timeout=10)
    assert not engine.thread.is_alive() and not engine.running


def test_waiting_queue_is_bounded(lm):
    engine = Engine(lm, EngineLimits(max_running=1, max_waiting=1))
    first = engine.submit([1], 50, temperature=0.0, stop_at_eos=False)
    iter(first).__next__()  # running
    engine.submit([1], 1, temperature=0.0)  # waiting
    with pytest.raises(EngineFull, match="at most 1"):
        engine.submit([1], 1, temperature=0.0)
    first.cancel()
    engine.close()


def test_kv_budget_holds_requests_back_until_rows_free(lm):
    watch = Steps()
    engine = Engine(lm, EngineLimits(max_running=8, kv_tokens=64), watch)  # each reserves 32 slots
    generations = [engine.submit([1, 2], 30, temperature=0.0, stop_at_eos=False) for _ in range(5)]
    assert all(len(list(g)) == 30 for g in generations)
    engine.close()
    assert max(s["running"] for s in watch.steps) == 2 and max(s["kv_reserved"] for s in watch.steps) <= 64


def test_a_request_that_fails_fails_alone(lm, monkeypatch):
    import gptcore.runtime.batching as batching

    real = batching.sample

    def fails_at_half(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("sampling broke")
        return real(logits, temperature, *args)

    monkeypatch.setattr(batching, "sample", fails_at_half)
    engine = Engine(lm)
    bad = engine.submit([1, 2, 3], 10, temperature=0.5, seed=0)
    good = engine.submit([1, 2, 3], 10, temperature=0.0, stop_at_eos=False)
    with pytest.raises(RuntimeError, match="sampling broke"):
        list(bad)
    assert list(good) == lm.generate_ids([1, 2, 3], 10, temperature=0.0, stop_at_eos=False)
    engine.close()


def test_a_row_leaving_while_the_next_prompt_has_written_nothing(lm):
    """Two decoding rows fill the cache's rows; a third prompt starts but writes nothing before one
    of the two leaves: the prompt has no row to move down yet, and decodes as it would alone."""
    batch = DecodeBatch(lm, max_rows=4)
    first, second = (Sequence([1, 2, 3], 5, lm.block_size) for _ in range(2))
    for seq in (first, second):
        batch.start(seq)
        batch.fill()
    assert batch.cache.rows == 2 and batch.decoding == [first, second]
    third = Sequence([4, 5, 6, 7], 6, lm.block_size)
    batch.start(third)
    batch.remove(first)
    while third.finish is None:
        batch.fill()
        batch.decode()
    assert third.tokens[4:] == lm.generate_ids([4, 5, 6, 7], 6, temperature=0.0, stop_at_eos=False)
