"""Where a registered version came from, for a person reading the registry: the runs that trained,
evaluated and exported it, and a short description with its headline figures and links to them.

The version's source run is the export run that produced its package, found by the package's
digest (the export stage tags its run with it), so MLflow's "Source run" shows the run whose
package this is, in whichever pipeline run it was made. The training and evaluation runs are
found beside the registration in the same pipeline run; a stage reused from the stage cache made
no run there, and its link is left out.
"""

from __future__ import annotations

from typing import Any

from gptcore.layout import PACKAGE_DIGEST_TAG
from gptcore.tracking import Tracking

# kind -> the stages whose runs produced a version of it
TRAINING_STAGE = {"lm": "pretrain", "classifier": "finetune", "chat": "sft"}
EVALUATION_STAGE = {"lm": "evaluate_lm", "classifier": "evaluate_classifier", "chat": "evaluate_sft"}
# the package description's shape fields, as the description names them
SHAPE = {"n_layer": "layers", "n_head": "heads", "block_size": "context", "vocab_size": "vocabulary"}


def _latest_run(client, experiment_id: str, filter_string: str):
    found = client.search_runs([experiment_id], filter_string, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def producing_runs(tracking: Tracking, experiment_id: str, kind: str, package_digest: str) -> dict[str, Any]:
    """role ('exported', 'trained', 'evaluated') -> the MLflow run, for those found."""
    client = tracking.client()
    runs = {"exported": _latest_run(client, experiment_id, f"tags.`{PACKAGE_DIGEST_TAG}` = '{package_digest}'")}
    if tracking.parent_run_id:
        for role, stage in (("trained", TRAINING_STAGE[kind]), ("evaluated", EVALUATION_STAGE[kind])):
            runs[role] = _latest_run(
                client,
                experiment_id,
                f"tags.`mlflow.parentRunId` = '{tracking.parent_run_id}' and tags.`gptcore.stage` = '{stage}'",
            )
    return {role: run for role, run in runs.items() if run is not None}


def run_link(run) -> str:
    """A markdown link to a run, relative to MLflow's UI (which renders descriptions as markdown)."""
    return f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"


def version_description(kind: str, metric: str, value: float, meta: dict, runs: dict[str, Any]) -> str:
    """A few lines for the version page: what it is, its headline figures, and its runs."""
    shape = ", ".join(f"{meta[k]} {what}" for k, what in SHAPE.items() if k in meta)
    lines = [
        f"gptcore {kind} (ONNX package): **{metric} {value:.4f}** on the test split.",
        f"{shape}; variants {', '.join(meta.get('variants', {'fp32': None}))}; "
        f"ONNX vs PyTorch max logit difference {meta['parity']['max_abs_logit_diff']:.1e}.",
    ]
    if runs:
        lines.append(" · ".join(f"{role} by {run_link(run)}" for role, run in runs.items()))
    return "\n\n".join(lines)
