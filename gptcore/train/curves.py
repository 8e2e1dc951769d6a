"""What a training stage's MLflow run shows: metric names grouped into the UI's sections, and one
chart with the train and validation losses together.

MLflow's chart view makes one chart per metric and groups charts by the name's prefix before a
`/`. So every loss is `loss/<split>` (one section holding the train and validation curves side by
side), the other training figures `train/...` and the other validation figures `val/...`; and
since MLflow draws no two metrics in one chart unasked, `charts/loss.png` draws them together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gptcore.errors import redact
from gptcore.tracking import StageRun, is_transient

log = logging.getLogger("gptcore.train")

LOSS_CHART = "charts/loss.png"


def tracked_name(key: str) -> str:
    """The MLflow name of a figure the training loop records: `train_loss` -> `loss/train`,
    `val_response_loss` -> `loss/val_response`, `val_accuracy` -> `val/accuracy`, `lr` -> `train/lr`."""
    if key.endswith("_loss"):
        return f"loss/{key.removesuffix('_loss')}"
    if key.startswith("val_"):
        return f"val/{key.removeprefix('val_')}"
    return f"train/{key}"


def loss_curves(metrics_log: Path) -> dict[str, list[tuple[int, float]]]:
    """Every loss in a stage's metrics.jsonl: name -> [(step, value)], in step order."""
    curves: dict[str, list[tuple[int, float]]] = {}
    if not metrics_log.is_file():
        return curves
    for line in metrics_log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.endswith("_loss"):
                curves.setdefault(key, []).append((record["step"], value))
    return curves


def log_loss_chart(run: StageRun, name: str, metrics_log: Path) -> None:
    """The stage's losses in one chart, as the run's `charts/loss.png`."""
    curves = loss_curves(metrics_log)
    if not run.enabled or not curves:
        return
    from matplotlib.figure import Figure  # no pyplot: no global figure state, safe off the main thread

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for key, points in sorted(curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=tracked_name(key))
    ax.set(title=f"{name}: loss", xlabel="step", ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        run.log_figure(fig, LOSS_CHART)
    except Exception as e:  # a picture is not worth failing a stage over: its metrics say the same
        if not is_transient(e):
            raise
        log.warning("%s: could not log %s (%s: %s)", name, LOSS_CHART, type(e).__name__, redact(str(e)))
