"""Promotion gates: whether a challenger beats the champion, on evidence (numpy only, no registry calls).

Both versions' figures on the same test examples (the evaluation stage keeps them, with a
digest of the examples) go through a paired bootstrap. A classifier is promoted when the
95% interval of its macro-F1 gain lies above `registry.min_improvement` and neither guard
regresses beyond `registry.guard_tolerance`: accuracy may not fall, calibration error (ECE)
may not rise, by more than that. A language model is promoted when the 95% interval of its
bits-per-byte reduction over the same test documents lies above `registry.lm_min_improvement`.
A difference the interval cannot tell from noise, a tie included, keeps the champion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptcore.config import RegistryConfig
from gptcore.metrics import paired_bootstrap, paired_bpb_bootstrap
from gptcore.results import DocScores, read_doc_scores, read_predictions


@dataclass
class GateDecision:
    promote: bool
    reason: str
    figures: dict = field(default_factory=dict)


def not_enough(threshold: float) -> str:
    return (
        "not a significant improvement"
        if threshold == 0
        else f"the interval does not lie above the required improvement {threshold}"
    )


def classifier_gate(champion: Path, challenger: Path, cfg: RegistryConfig) -> GateDecision:
    """Whether the challenger's predictions (npz) beat the champion's on the same examples."""
    labels, probs_champion = read_predictions(champion)
    challenger_labels, probs_challenger = read_predictions(challenger)
    if not np.array_equal(labels, challenger_labels):
        return GateDecision(False, "the two versions' test examples differ: not comparable")
    return compare_classifiers(labels, probs_champion, probs_challenger, cfg)


def compare_classifiers(
    labels: np.ndarray, probs_champion: np.ndarray, probs_challenger: np.ndarray, cfg: RegistryConfig
) -> GateDecision:
    """The classifier gate on two versions' (N, K) probabilities for the same labelled examples."""
    if probs_champion.shape != probs_challenger.shape:
        return GateDecision(
            False,
            f"the two versions' predictions differ in shape ({probs_champion.shape} vs "
            f"{probs_challenger.shape}): not comparable",
        )
    paired = paired_bootstrap(
        labels, probs_champion, probs_challenger, probs_champion.shape[1], resamples=cfg.bootstrap_resamples
    )
    f1, accuracy, ece = paired["macro_f1"], paired["accuracy"], paired["ece"]
    gain = f"macro-F1 {f1['delta']:+.4f} (95% CI {f1['ci'][0]:+.4f} to {f1['ci'][1]:+.4f}, {len(labels)} examples)"
    if f1["ci"][0] <= cfg.min_improvement:
        return GateDecision(False, f"{gain}: {not_enough(cfg.min_improvement)}", paired)
    if accuracy["delta"] < -cfg.guard_tolerance:
        return GateDecision(
            False, f"{gain}, but accuracy falls by {-accuracy['delta']:.4f} (tolerance {cfg.guard_tolerance})", paired
        )
    if ece["delta"] > cfg.guard_tolerance:
        return GateDecision(
            False,
            f"{gain}, but calibration error rises by {ece['delta']:.4f} (tolerance {cfg.guard_tolerance})",
            paired,
        )
    return GateDecision(
        True,
        f"{gain}: significant; accuracy {accuracy['delta']:+.4f}, ECE {ece['delta']:+.4f} within tolerance",
        paired,
    )


def lm_gate(champion: Path, challenger: Path, cfg: RegistryConfig) -> GateDecision:
    """Whether the challenger's per-document bits per byte (npz) beat the champion's on the same documents."""
    return compare_lms(read_doc_scores(champion), read_doc_scores(challenger), cfg)


def compare_lms(champion: DocScores, challenger: DocScores, cfg: RegistryConfig) -> GateDecision:
    """The LM gate on two versions' per-document scores of the same documents."""
    if not (np.array_equal(champion.doc_ids, challenger.doc_ids) and np.array_equal(champion.bytes, challenger.bytes)):
        return GateDecision(False, "the two versions' test documents differ: not comparable")
    paired = paired_bpb_bootstrap(champion.nats, challenger.nats, champion.bytes, resamples=cfg.bootstrap_resamples)
    bpb, reduction = paired["bpb"], paired["reduction"]
    gain = (
        f"bits per byte {bpb['a']:.4f} -> {bpb['b']:.4f}, reduction {reduction['delta']:+.4f} (95% CI "
        f"{reduction['ci'][0]:+.4f} to {reduction['ci'][1]:+.4f}, {paired['documents']} documents)"
    )
    if reduction["ci"][0] <= cfg.lm_min_improvement:
        return GateDecision(False, f"{gain}: {not_enough(cfg.lm_min_improvement)}", paired)
    return GateDecision(True, f"{gain}: significant", paired)
