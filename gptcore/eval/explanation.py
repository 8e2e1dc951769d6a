"""An explanation of one classified passage, and how it reads: an HTML page of tokens shaded by
attribution (red for the explained class, blue against), or a table of text lines.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.fsutil import atomic_file


@dataclass
class Explanation:
    tokens: list[str]  # each token decoded on its own
    attributions: np.ndarray  # (T,) per token, towards `target`; sums to ≈ logit - baseline_logit
    probs: np.ndarray  # (K,) class probabilities
    baseline_probs: np.ndarray  # (K,) and on the baseline: attributions explain the move from these
    classes: list[str]
    target: int  # the class explained
    logit: float  # its logit on the input
    baseline_logit: float  # and on the baseline
    points: int  # points of the path evaluated
    label: int | None = None  # the true class, when known
    doc_id: str | None = None

    @property
    def predicted(self) -> int:
        return int(self.probs.argmax())

    @property
    def completeness_gap(self) -> float:
        """|sum of attributions - (logit - baseline logit)|: the numerical error of the integral."""
        return abs(float(self.attributions.sum()) - (self.logit - self.baseline_logit))


def shade(value: float) -> str:
    """A background for an attribution scaled to [-1, 1]: red for the explained class, blue against."""
    rgb = "220, 38, 38" if value > 0 else "37, 99, 235"
    return f"rgba({rgb}, {min(abs(value), 1.0) * 0.85:.3f})"


def _passage_html(ex: Explanation) -> str:
    e = html.escape
    scale = float(np.abs(ex.attributions).max()) or 1.0  # normalised per passage
    spans = "".join(
        f'<span style="background:{shade(a / scale)}" title="{a:+.4f}">{e(t)}</span>'
        for t, a in zip(ex.tokens, ex.attributions)
    )
    predicted = ex.classes[ex.predicted]
    head = [f"predicted <b>{e(predicted)}</b> (p = {ex.probs[ex.predicted]:.3f})"]
    if ex.label is not None:
        verdict = "right" if ex.label == ex.predicted else "wrong"
        head.insert(0, f"true <b>{e(ex.classes[ex.label])}</b>")
        head.append(f'<span class="{verdict}">{verdict}</span>')
    if ex.doc_id is not None:
        head.append(f"document {e(ex.doc_id)}")
    total, diff = float(ex.attributions.sum()), ex.logit - ex.baseline_logit
    return (
        f'<div class="passage"><div class="head">{" · ".join(head)}</div>'
        f'<div class="tokens">{spans}</div>'
        f'<div class="check">towards {e(ex.classes[ex.target])}: sum of attributions {total:+.4f}, '
        f"logit - baseline logit {diff:+.4f} (gap {ex.completeness_gap:.4f}, {ex.points} points); "
        f"{e(_baseline_says(ex))}</div></div>"
    )


def _baseline_says(ex: Explanation) -> str:
    k = int(ex.baseline_probs.argmax())
    return f"the baseline (zero token embeddings) predicts {ex.classes[k]} (p = {ex.baseline_probs[k]:.3f})"


def render_html(explanations: list[Explanation], title: str) -> str:
    """A self-contained page: every passage's tokens shaded by attribution, with its labels."""
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}.passage{margin:1.5em 0}"
        ".tokens{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:.5em}"
        ".check{color:#666;font-size:85%}.right{color:#15803d}.wrong{color:#b91c1c}"
    )
    legend = (
        f"<p>Integrated gradients over the token embeddings (zero baseline). "
        f'<span style="background:{shade(1)}">red</span>: evidence for the predicted class, '
        f'<span style="background:{shade(-1)}">blue</span>: against it; shading is relative to '
        "each passage's largest attribution. Hover a token for its value.</p>"
    )
    body = "\n".join(_passage_html(ex) for ex in explanations)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>{legend}\n{body}\n</body></html>\n"
    )


def write_html(path: str | Path, explanations: list[Explanation], title: str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(render_html(explanations, title), encoding="utf-8")
    return path


def format_table(ex: Explanation) -> str:
    """The explanation as readable text: prediction, probabilities, one line per token."""
    lines = [
        f"predicted: {ex.classes[ex.predicted]} (p = {ex.probs[ex.predicted]:.3f})",
        "probabilities: " + ", ".join(f"{c} {p:.3f}" for c, p in zip(ex.classes, ex.probs)),
        f"attributions towards {ex.classes[ex.target]} (integrated gradients, {ex.points} points): "
        f"sum {float(ex.attributions.sum()):+.4f}, logit - baseline logit {ex.logit - ex.baseline_logit:+.4f}; "
        f"{_baseline_says(ex)}",
        "",
        f"{'#':>4}  {'token':<16}  {'attribution':>11}",
    ]
    scale = float(np.abs(ex.attributions).max()) or 1.0
    for i, (t, a) in enumerate(zip(ex.tokens, ex.attributions)):
        bar = ("+" if a > 0 else "-") * round(20 * abs(a) / scale)
        lines.append(f"{i:>4}  {t!r:<16}  {a:>+11.4f}  {bar}")
    return "\n".join(lines)
