"""Promotion of one registered version as a Prefect flow: evaluated against the champion on a
labelled file, it takes the `champion` alias only if it passes the promotion gate there.

The work is `gptcore.registry.promotion.promote_version`; this flow resolves the settings.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from flows.tasks import flow_run_tags, gptcore_logs_to_prefect
from gptcore.layout import Workdir
from gptcore.presets import load_config
from gptcore.registry.promotion import promote_version
from gptcore.tracking import Tracking, load_settings


@flow(name="gptcore-promote")
def promote_flow(
    name: str,
    version: int,
    data_path: str,
    text_field: str = "text",
    label_field: str | None = None,
    preset: str = "default",
    config_path: str | None = None,
    workdir: str = "gptcore-work",
    mlflow_config: str | None = None,
) -> dict[str, Any]:
    """Evaluate `models:/NAME/VERSION` against `models:/NAME@champion` on `data_path`; promote on evidence.

    The gate's thresholds are the `registry` section of the preset/config, as at registration; a
    classifier's labels are read from `label_field`, by default the column it was fine-tuned on
    (`finetune.label_field`).
    """
    w = Workdir(workdir)
    cfg = load_config(config_path, preset)
    tracking = Tracking(load_settings(w.root, mlflow_config), run_tags=flow_run_tags())
    with gptcore_logs_to_prefect():
        result = promote_version(
            name,
            version,
            data_path,
            tracking,
            text_field=text_field,
            label_field=label_field or cfg.finetune.label_field,
            gate=cfg.registry,
            output=w.eval / f"promote_{name}_v{version}.json",
        )
    return asdict(result)
