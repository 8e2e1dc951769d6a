"""The classifier's promotion gate: a challenger replaces the champion only on evidence.

Both versions' predictions on the same test examples (the evaluation stage keeps them, with a
digest of the examples) go through a paired bootstrap. The challenger is promoted when the
95% interval of its macro-F1 gain lies above `registry.min_improvement` and neither guard
regresses beyond `registry.guard_tolerance`: accuracy may not fall, calibration error (ECE)
may not rise, by more than that. A difference the interval cannot tell from noise, a tie
included, keeps the champion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptcore.config import RegistryConfig
from gptcore.metrics import paired_bootstrap


@dataclass
class GateDecision:
    promote: bool
    reason: str
    figures: dict = field(default_factory=dict)


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probs (N, K)) as the evaluation stage wrote them; no pickle is loaded."""
    with np.load(path, allow_pickle=False) as f:
        return f["labels"], f["probs"]


def classifier_gate(champion: Path, challenger: Path, cfg: RegistryConfig) -> GateDecision:
    """Whether the challenger's predictions (npz) beat the champion's on the same examples."""
    labels, probs_champion = read_predictions(champion)
    challenger_labels, probs_challenger = read_predictions(challenger)
    if not np.array_equal(labels, challenger_labels) or probs_champion.shape != probs_challenger.shape:
        return GateDecision(False, "the two versions' test examples differ: not comparable")
    paired = paired_bootstrap(labels, probs_champion, probs_challenger, probs_champion.shape[1],
                              resamples=cfg.bootstrap_resamples)
    f1, accuracy, ece = paired["macro_f1"], paired["accuracy"], paired["ece"]
    gain = f"macro-F1 {f1['delta']:+.4f} (95% CI {f1['ci'][0]:+.4f} to {f1['ci'][1]:+.4f}, {len(labels)} examples)"
    if f1["ci"][0] <= cfg.min_improvement:
        return GateDecision(False, f"{gain}: not a significant improvement", paired)
    if accuracy["delta"] < -cfg.guard_tolerance:
        return GateDecision(False, f"{gain}, but accuracy falls by {-accuracy['delta']:.4f} "
                                   f"(tolerance {cfg.guard_tolerance})", paired)
    if ece["delta"] > cfg.guard_tolerance:
        return GateDecision(False, f"{gain}, but calibration error rises by {ece['delta']:.4f} "
                                   f"(tolerance {cfg.guard_tolerance})", paired)
    return GateDecision(True, f"{gain}: significant; accuracy {accuracy['delta']:+.4f}, ECE {ece['delta']:+.4f} "
                              "within tolerance", paired)
