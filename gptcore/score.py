"""Batch scoring as a pipeline stage: a registered (or local) classifier over a file of texts.

The work itself is `gptcore.runtime.score_file`, torch-free; this stage resolves the model
through the tracking settings and logs what it scored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gptcore.errors import InputError
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.score")


@dataclass
class ScoreResult:
    output_path: str
    rows: int
    model_uri: str
    provider: str
    label_counts: dict[str, int]
    seconds: float


def score(
    model_uri: str, input_path: str | Path, output_path: str | Path, text_field: str = "text",
    tracking: Tracking | None = None, batch_size: int = 64, device: str = "auto",
) -> ScoreResult:
    """Classify every row of `input_path` (.parquet/.jsonl/.csv) into Parquet at `output_path`."""
    import pyarrow.parquet as pq

    from gptcore.runtime import OnnxClassifier, load_model, score_file

    start = time.perf_counter()
    tracking_uri = tracking.settings.tracking_uri if tracking else None
    model = load_model(model_uri, device=device, tracking_uri=tracking_uri)
    if not isinstance(model, OnnxClassifier):
        raise InputError(f"{model_uri}: is a language model; scoring needs a classifier")
    with stage_run(tracking, "score", tags={"gptcore.model_uri": model_uri}) as run:
        rows = score_file(model, input_path, output_path, text_field=text_field, batch_size=batch_size)
        labels = Counter(pq.read_table(output_path, columns=["label"]).column("label").to_pylist())
        result = ScoreResult(str(output_path), rows, model_uri, model.provider, dict(labels), time.perf_counter() - start)
        run.log_params({"input": str(input_path), "output": str(output_path), "provider": model.provider})
        run.log_metrics({"rows": rows, "rows_per_s": rows / result.seconds}
                        | {f"predicted_{k}": v for k, v in labels.items()})
    log.info("score: %d rows of %s -> %s with %s on %s in %.1fs", rows, input_path, output_path, model_uri,
             model.provider, result.seconds)
    return result

