"""The MLflow model registry: register exported packages, and promote by evidence.

Each registered version is a self-contained model package (ONNX graph, tokenizer, description)
logged as artifacts of a `register_*` run, tagged with the data digest, tokenizer digest, git
commit and config. A new version gets the alias `challenger`; it takes `champion` only when it
beats the current champion on the stage's metric (test bits per byte for the LM, lower is
better; test macro-F1 for the classifier, higher is better). The first version is champion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.errors import ConfigError
from gptcore.evaluate import read_eval
from gptcore.export import load_export
from gptcore.tracking import Tracking, source_tags, stage_run

log = logging.getLogger("gptcore.registry")

CHAMPION, CHALLENGER = "champion", "challenger"
# kind -> (metric, direction, where the metric sits in the evaluation JSON)
PROMOTION_METRIC = {
    "lm": ("test_bpb", "min", ("test", "bpb")),
    "classifier": ("test_macro_f1", "max", ("test", "macro_f1")),
}


@dataclass
class RegisterResult:
    name: str
    version: str
    metric: str
    value: float
    champion_version: str
    promoted: bool
    reason: str

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"


def beats(value: float, incumbent: float | None, direction: str) -> bool:
    if incumbent is None:
        return True
    return value < incumbent if direction == "min" else value > incumbent


def current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(
    package_dir: str | Path, eval_path: str | Path, name: str, tracking: Tracking | None,
    config: dict[str, Any] | None = None,
) -> RegisterResult:
    """Register the package in `package_dir` as a new version of `name`, and promote it if it wins."""
    if tracking is None:
        raise ConfigError("register: needs MLflow tracking settings (a registry to register into)")
    from mlflow.exceptions import MlflowException

    meta = load_export(package_dir)
    metric, direction, (section, key) = PROMOTION_METRIC[meta["kind"]]
    value = float(read_eval(eval_path)[section][key])
    tags = {"gptcore.kind": meta["kind"], "gptcore.data_digest": meta["data_digest"],
            "gptcore.tokenizer_digest": meta["tokenizer_digest"], "gptcore.tokens_digest": meta.get("tokens_digest"),
            f"gptcore.metric.{metric}": value,
            "gptcore.parity": json.dumps(meta["parity"]), **source_tags()}
    if config is not None:
        tags["gptcore.config"] = json.dumps(config, sort_keys=True)[:5000]
    client = tracking.client()
    with stage_run(tracking, f"register_{meta['kind']}", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        run.log_artifacts(package_dir, "model")
        try:
            client.create_registered_model(name, description=f"gptcore {meta['kind']} (ONNX package)")
        except MlflowException:
            pass  # already registered
        version = client.create_model_version(name, source=run.artifact_uri("model"), run_id=run.run_id,
                                              tags={k: str(v) for k, v in tags.items()}).version
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion = current_champion(client, name)
        incumbent = None if champion is None else champion.tags.get(f"gptcore.metric.{metric}")
        incumbent = None if incumbent is None else float(incumbent)
        promoted = beats(value, incumbent, direction)
        if champion is None:
            reason = "first version"
        else:
            reason = (f"{metric} {value:.4f} {'beats' if promoted else 'does not beat'} champion "
                      f"v{champion.version}'s {incumbent if incumbent is None else round(incumbent, 4)}")
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "gptcore.promotion", reason)
        champion_version = version if promoted else champion.version
        run.log_metrics({metric: value, "promoted": float(promoted)})
        run.set_tags({"gptcore.registered_model": f"{name}/{version}", "gptcore.promotion": reason})
    log.info("register: %s v%s (%s %.4f): %s; champion is v%s", name, version, metric, value,
             "promoted" if promoted else "kept as challenger", champion_version)
    return RegisterResult(name, str(version), metric, value, str(champion_version), promoted, reason)
