"""Per-document scoring windows and the paired bits-per-byte bootstrap (numpy only)."""

import math

import numpy as np
import pytest

from gptcore.eval.lm import take_documents
from gptcore.metrics import document_distribution, document_windows, paired_bpb_bootstrap, score_documents
from gptcore.results import DocScores, read_doc_scores, write_doc_scores

EOT = 0


def stream(*docs):
    return np.concatenate([np.r_[np.asarray(d, dtype=np.int64), EOT] for d in docs])


def test_take_documents_splits_on_eot_skips_empty_and_caps_whole_documents():
    tokens = stream([5, 6, 7], [], [8], [9, 9, 9, 9])
    docs = take_documents(tokens, EOT, max_targets=100, chunk=3)  # documents cross chunk borders
    assert [d.tolist() for d in docs] == [[5, 6, 7], [8], [9, 9, 9, 9]]
    # targets: 3 + 1, then 1 + 1 = 6; the third document (5 targets) would pass 8
    assert [d.tolist() for d in take_documents(tokens, EOT, max_targets=8)] == [[5, 6, 7], [8]]
    assert [d.tolist() for d in take_documents(tokens, EOT, max_targets=3)] == [[5, 6]]  # the first one, cut


def test_every_target_is_scored_once_with_at_least_half_a_block_of_context():
    docs = [np.arange(1, n + 1) for n in (1, 7, 8, 9, 40)]
    T = 8
    for d, doc in enumerate(docs):
        seq = np.r_[EOT, doc, EOT]
        scored = []
        windows = [w for w in document_windows(docs, EOT, T) if w[2] == d]
        for i, (window, count, _) in enumerate(windows):
            assert len(window) <= T + 1
            start = next(s for s in range(len(seq)) if np.array_equal(seq[s : s + len(window)], window))
            first_target = start + len(window) - count  # index in seq of the first scored target
            scored.extend(range(first_target, start + len(window)))
            if i:
                assert first_target - start >= T // 2  # context within the window before that target
        assert scored == list(range(1, len(seq)))


def test_score_documents_adds_each_documents_targets():
    docs = [np.arange(1, n + 1) for n in (3, 30, 5)]

    def target_as_nats(inputs, targets):  # a "model" whose NLL is the target id: sums are checkable
        return np.where(targets >= 0, targets, 0).astype(float)

    nats = score_documents(docs, EOT, block_size=8, vocab_size=64, nll_fn=target_as_nats)
    assert nats.tolist() == [float(d.sum() + EOT) for d in docs]


def test_doc_scores_round_trip_without_pickle_and_summary(tmp_path):
    scores = DocScores(
        np.array(["a/1", "b"]), np.array([math.log(2) * 8, math.log(2) * 30]), np.array([3, 9]), np.array([8, 10])
    )
    write_doc_scores(tmp_path / "d.npz", scores)
    back = read_doc_scores(tmp_path / "d.npz")
    assert back.doc_ids.tolist() == ["a/1", "b"] and back.bpb.tolist() == pytest.approx([1.0, 3.0])
    summary = document_distribution(back)
    assert summary["documents"] == 2 and summary["median"] == pytest.approx(2.0)
    assert summary["bpb"] == pytest.approx(38 / 18)  # pooled: all nats over all bytes


def test_paired_bpb_bootstrap_sees_a_real_reduction_and_not_noise():
    rng = np.random.default_rng(0)
    n_bytes = rng.integers(100, 1000, size=300)
    champion = n_bytes * math.log(2) * rng.normal(2.0, 0.3, size=300)
    better = paired_bpb_bootstrap(champion, champion * 0.95, n_bytes)
    assert better["reduction"]["delta"] == pytest.approx(0.05 * better["bpb"]["a"])
    assert better["reduction"]["ci"][0] > 0
    assert better["ratio"]["value"] == pytest.approx(0.95) and better["ratio"]["ci"] == pytest.approx([0.95, 0.95])
    same = paired_bpb_bootstrap(champion, champion, n_bytes)
    assert same["reduction"]["delta"] == 0 and same["reduction"]["ci"] == [0.0, 0.0]
    noise = paired_bpb_bootstrap(champion, champion * rng.normal(1.0, 0.05, size=300), n_bytes)
    assert noise["reduction"]["ci"][0] < 0 < noise["reduction"]["ci"][1]
    assert noise["ratio"]["ci"][0] < 1 < noise["ratio"]["ci"][1]
