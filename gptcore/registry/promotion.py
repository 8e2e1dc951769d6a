"""Promotion: a registered version takes the `champion` alias only on evidence, and the decision goes on record.

At registration (`decide`), a new version is compared with the champion through the paired
gates (`gptcore.registry.gates`) on the test examples both were evaluated on, whose digests
must agree; against a champion that kept no such evidence it must beat the champion's stored
test metric. On demand (`promote_version`, the `promote-version` deployment), a registered
version is evaluated beside the champion on a labelled file (`gptcore.registry.compare`) and
promoted only if it passes the same gate there. Either way `apply_decision` moves the alias and
tags both versions with the decision, its figures and its reason.

The alias is moved by compare-and-set: `apply_decision` reads it again just before acting, and if
another promotion or registration moved it since the decision's champion was read, it changes
nothing and raises `AliasMovedError` naming where it points now (the decision was made against a
version that is no longer the champion). MLflow has no atomic compare-and-set on an alias, so a
window remains between that read and the write: one registry round trip (milliseconds), where
before it was the whole evaluation (seconds at registration, minutes for `promote_version`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gptcore.config import RegistryConfig
from gptcore.errors import GptcoreError, InputError
from gptcore.layout import CHAMPION, PREDICTIONS_TAG
from gptcore.registry.compare import evaluate_versions
from gptcore.registry.gates import GateDecision, classifier_gate
from gptcore.tracking import Tracking

log = logging.getLogger("gptcore.registry")


class AliasMovedError(GptcoreError):
    """The champion alias moved while a promotion decided against the version it pointed at."""


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


def version_artifact(tracking: Tracking, version, tag: str, out_dir: Path) -> Path | None:
    """The artifact a version's tag `tag` names, downloaded from its registration run (None if it has none)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    artifact = version.tags.get(tag)
    if artifact is None:
        return None
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=version.run_id,
                artifact_path=artifact,
                dst_path=str(out_dir),
                tracking_uri=tracking.settings.tracking_uri,
            )
        )
    except (MlflowException, OSError):
        return None


def decide(
    tracking: Tracking,
    champion,
    metric: str,
    value: float,
    direction: str,
    predictions: Path | None,
    examples_digest: str | None,
    gate: RegistryConfig,
    paired_gate=classifier_gate,
) -> GateDecision:
    """Promote or not: the paired gate where both versions have predictions, else the stored metric."""
    if champion is None:
        return GateDecision(True, "first version")
    champion_digest = champion.tags.get("gptcore.test_examples_digest")
    if predictions is not None and champion_digest is not None:
        if champion_digest != examples_digest:
            return GateDecision(
                False,
                f"champion v{champion.version} was evaluated on other test examples "
                f"({champion_digest[:12]} vs {examples_digest[:12]}): not comparable",
            )
        with tempfile.TemporaryDirectory() as tmp:
            theirs = version_artifact(tracking, champion, PREDICTIONS_TAG, Path(tmp))
            if theirs is not None:
                decision = paired_gate(theirs, predictions, gate)
                decision.reason = f"against champion v{champion.version}: {decision.reason}"
                return decision
    incumbent = champion.tags.get(f"gptcore.metric.{metric}")
    incumbent = None if incumbent is None else float(incumbent)
    promoted = beats(value, incumbent, direction)
    return GateDecision(
        promoted,
        f"{metric} {value:.4f} {'beats' if promoted else 'does not beat'} champion "
        f"v{champion.version}'s {incumbent if incumbent is None else round(incumbent, 4)}",
    )


def _version_of(champion) -> str | None:
    return None if champion is None else str(champion.version)


def apply_decision(client, name: str, version: str, champion, decision: GateDecision) -> None:
    """Give `version` the champion alias if the decision promotes it; the decision goes on record on
    both versions (the champion's as a `gptcore.challenge.v<version>` tag).

    `champion` is the version the decision was made against: if the alias points elsewhere now,
    AliasMovedError is raised and nothing is changed.
    """
    now = current_champion(client, name)
    if _version_of(now) != _version_of(champion):
        expected = "no champion" if champion is None else f"v{champion.version}"
        moved_to = f"v{now.version}" if now is not None else "no version (the alias was removed)"
        raise AliasMovedError(
            f"models:/{name}@{CHAMPION} now points at {moved_to}, not {expected} as when v{version} was judged "
            f"against it: nothing changed; v{version} is to be judged again, against the champion of now"
        )
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "gptcore.promotion", decision.reason)
    if decision.figures:
        client.set_model_version_tag(name, version, "gptcore.gate", json.dumps(decision.figures))
    if champion is not None:
        client.set_model_version_tag(
            name,
            champion.version,
            f"gptcore.challenge.v{version}",
            f"{'lost to' if decision.promote else 'kept against'} v{version}: {decision.reason}",
        )


@dataclass
class Promotion:
    """What `promote_version` decided: the champion's version before and after, and why."""

    name: str
    version: str
    champion_before: str | None
    champion: str
    promoted: bool
    reason: str


def promote_version(
    name: str,
    version: str | int,
    data: str | Path,
    tracking: Tracking,
    text_field: str = "text",
    label_field: str = "label",
    gate: RegistryConfig | None = None,
    output: str | Path | None = None,
    device: str = "auto",
) -> Promotion:
    """Evaluate version `version` of registered model `name` against its champion on `data`, and move
    the `champion` alias to it only if it passes the promotion gate there.

    The decision goes on record on both versions as a registration's does (`apply_decision`);
    the evaluation report is logged to `tracking` and written to `output` when given.
    """
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        raise InputError(f"models:/{name}/{version}: no such registered version ({e.message})") from None
    champion = current_champion(client, name)
    before = None if champion is None else str(champion.version)
    if before == version:
        return Promotion(name, version, before, before, False, f"v{version} is already the champion")
    if champion is None:
        decision = GateDecision(True, "no champion yet")
    else:
        uris = [f"models:/{name}/{before}", f"models:/{name}/{version}"]
        report = evaluate_versions(
            uris,
            data,
            text_field,
            label_field,
            output=output,
            tracking=tracking,
            tracking_uri=tracking.settings.tracking_uri,
            registry_uri=tracking.settings.registry_uri,
            gate=gate,
            device=device,
        )
        comparison = report["comparisons"][0]
        decision = GateDecision(
            comparison["promote"],
            f"on {data}, against champion v{before}: {comparison['reason']}",
            comparison["figures"],
        )
    apply_decision(client, name, version, champion, decision)
    result = Promotion(
        name, version, before, version if decision.promote else before, decision.promote, decision.reason
    )
    log.info("promote: %s v%s: %s; champion is v%s", name, version, decision.reason, result.champion)
    return result
