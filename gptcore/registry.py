"""The MLflow model registry: register exported packages, and promote by evidence.

Each registered version is an MLflow pyfunc model (`gptcore.runtime.pyfunc`, logged as models
from code: no pickle) that carries the self-contained model package (ONNX graph, tokenizer,
description) as its artifact `package`, so `mlflow.pyfunc.load_model` and `mlflow models serve`
generate and classify with it, and `gptcore.runtime.load_model` finds the package inside. It is
a LoggedModel of a `register_*` run, tagged with the data digest, tokenizer digest, git commit
and config. A new version gets the alias `challenger`; the first version is champion.
A version takes `champion` through a paired-bootstrap gate (`gptcore.promotion`) on the test
examples both versions were evaluated on: the classifier's per-passage predictions, the LM's
per-document bits per byte. Against a champion that kept no such evidence, it must beat the
champion's stored test metric (bits per byte, lower is better; macro-F1, higher). The decision
and its figures are tags on both versions.

A classifier version also keeps the torch checkpoint its package was exported from (safetensors,
model.json, tokenizer.json) under `checkpoint/` of its run, for `gptcore explain`, and its test
documents' probabilities as batch scoring reads them (the evaluation's scoring reference, tag
`gptcore.scoring_reference_artifact`), the drift monitor's reference (`gptcore.score`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version as installed_version
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.checkpoint import load_classifier
from gptcore.config import RegistryConfig
from gptcore.errors import ConfigError, InputError
from gptcore.evaluate import read_eval
from gptcore.export import load_export
from gptcore.fsutil import sha256_file
from gptcore.model import GPTClassifier
from gptcore.promotion import GateDecision, classifier_gate, lm_gate
from gptcore.runtime.package import model_version
from gptcore.tracking import Tracking, source_tags, stage_run

log = logging.getLogger("gptcore.registry")

CHAMPION, CHALLENGER = "champion", "challenger"
PARITY_TAG_FIELDS = ("max_abs_logit_diff", "greedy_agreement", "greedy_tokens_equal")
CHECKPOINT_ARTIFACT, CHECKPOINT_TAG = "checkpoint", "gptcore.checkpoint_artifact"
CHECKPOINT_FILES = ("model.safetensors", "model.json")  # never state.pt: readers stay pickle-free
PREDICTIONS_TAG, SCORING_REFERENCE_TAG = "gptcore.predictions_artifact", "gptcore.scoring_reference_artifact"
# kind -> (metric, direction, where the metric sits in the evaluation JSON)
PROMOTION_METRIC = {
    "lm": ("test_bpb", "min", ("test", "bpb")),
    "classifier": ("test_macro_f1", "max", ("test", "macro_f1")),
}
# kind -> (the key of its per-example evidence in the evaluation's test section, the gate that pairs it)
EVIDENCE = {"lm": ("documents", lm_gate), "classifier": ("predictions", classifier_gate)}
PYFUNC_CODE = Path(__file__).parent / "runtime" / "pyfunc_model.py"
# What the pyfunc imports, pinned as installed here: gptcore.runtime's needs, never torch. gptcore
# itself is not among them (it is no index package, and its full requirements bring torch): an
# environment that serves a version installs gptcore beside these (`--env-manager local` has it).
PYFUNC_REQUIREMENTS = ("mlflow", "onnxruntime-gpu", "tokenizers", "numpy", "pandas", "pyarrow")


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


def version_artifact(tracking: Tracking, version, tag: str, out_dir: Path) -> Path | None:
    """The artifact a version's tag `tag` names, downloaded from its registration run (None if it has none)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    artifact = version.tags.get(tag)
    if artifact is None:
        return None
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact,
                                                        dst_path=str(out_dir),
                                                        tracking_uri=tracking.settings.tracking_uri))
    except (MlflowException, OSError):
        return None


def champion_predictions(tracking: Tracking, champion, out_dir: Path) -> Path | None:
    """The champion's test predictions, downloaded from its registration run (None if it has none)."""
    return version_artifact(tracking, champion, PREDICTIONS_TAG, out_dir)


def decide(tracking: Tracking, champion, metric: str, value: float, direction: str, predictions: Path | None,
           examples_digest: str | None, gate: RegistryConfig, paired_gate=classifier_gate) -> GateDecision:
    """Promote or not: the paired gate where both versions have predictions, else the stored metric."""
    if champion is None:
        return GateDecision(True, "first version")
    champion_digest = champion.tags.get("gptcore.test_examples_digest")
    if predictions is not None and champion_digest is not None:
        if champion_digest != examples_digest:
            return GateDecision(False, f"champion v{champion.version} was evaluated on other test examples "
                                       f"({champion_digest[:12]} vs {examples_digest[:12]}): not comparable")
        with tempfile.TemporaryDirectory() as tmp:
            theirs = champion_predictions(tracking, champion, Path(tmp))
            if theirs is not None:
                decision = paired_gate(theirs, predictions, gate)
                decision.reason = f"against champion v{champion.version}: {decision.reason}"
                return decision
    incumbent = champion.tags.get(f"gptcore.metric.{metric}")
    incumbent = None if incumbent is None else float(incumbent)
    promoted = beats(value, incumbent, direction)
    return GateDecision(promoted, f"{metric} {value:.4f} {'beats' if promoted else 'does not beat'} champion "
                                  f"v{champion.version}'s {incumbent if incumbent is None else round(incumbent, 4)}")


def apply_decision(client, name: str, version: str, champion, decision: GateDecision) -> None:
    """Give `version` the champion alias if the decision promotes it; the decision goes on record on
    both versions (the champion's as a `gptcore.challenge.v<version>` tag)."""
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "gptcore.promotion", decision.reason)
    if decision.figures:
        client.set_model_version_tag(name, version, "gptcore.gate", json.dumps(decision.figures))
    if champion is not None:
        client.set_model_version_tag(name, champion.version, f"gptcore.challenge.v{version}",
                                     f"{'lost to' if decision.promote else 'kept against'} v{version}: {decision.reason}")


def pyfunc_requirements() -> list[str]:
    pins = []
    for package in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{package}=={installed_version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_pyfunc(run, package_dir: str | Path, meta: dict[str, Any]):
    """Log the package as an MLflow pyfunc LoggedModel of `run`; return the LoggedModel.

    Driven through the run's client like every other log call here: MLflow's fluent
    `log_model` would need the process-wide tracking URI and active run.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from gptcore.runtime.pyfunc import signature

    client = run.client
    experiment_id = client.get_run(run.run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name="model", source_run_id=run.run_id,
                                       model_type=f"gptcore-{meta['kind']}")
    client.log_outputs(run.run_id, [LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example, on purpose: MLflow would load the model and run it to check one.
        warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            local, python_model=str(PYFUNC_CODE), artifacts={"package": str(package_dir)},
            signature=signature(meta), pip_requirements=pyfunc_requirements(),
            mlflow_model=Model(artifact_path=model.artifact_location, run_id=run.run_id, model_id=model.model_id,
                               model_uuid=model.model_id))
        client.log_model_artifacts(model.model_id, str(local))
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def source_checkpoint(meta: dict[str, Any]) -> Path | None:
    """The classifier checkpoint a package was exported from, if it is still there unchanged."""
    source = meta.get("checkpoint")
    if meta["kind"] != "classifier" or source is None:
        return None
    directory = Path(source["dir"])
    if not (directory / "model.safetensors").is_file():
        log.warning("register: %s, the checkpoint the package was exported from, is gone: this version gets "
                    "no torch checkpoint, so `gptcore explain` cannot explain it", directory)
        return None
    if sha256_file(directory / "model.safetensors") != source["weights_sha256"]:
        raise InputError(f"{directory}: its weights changed since the package was exported from it "
                         "(fine-tuned again?); run `gptcore export` again before registering")
    return directory


def register(
    package_dir: str | Path, eval_path: str | Path, name: str, tracking: Tracking | None,
    config: dict[str, Any] | None = None, gate: RegistryConfig | None = None,
) -> RegisterResult:
    """Register the package in `package_dir` as a new version of `name`, and promote it if it wins."""
    if tracking is None:
        raise ConfigError("register: needs MLflow tracking settings (a registry to register into)")
    from mlflow.exceptions import MlflowException

    gate = gate or RegistryConfig()
    meta = load_export(package_dir)
    metric, direction, (section, key) = PROMOTION_METRIC[meta["kind"]]
    evaluation = read_eval(eval_path)
    value = float(evaluation[section][key])
    evidence, paired_gate = EVIDENCE[meta["kind"]]
    kept = evaluation[section].get(evidence)
    predictions = Path(eval_path).parent / kept["file"] if kept else None
    scoring_reference = evaluation[section].get("scoring_reference")  # a classifier's, evaluated since it was kept
    scoring_reference = Path(eval_path).parent / scoring_reference["file"] if scoring_reference else None
    tags = {"gptcore.kind": meta["kind"], "gptcore.data_digest": meta["data_digest"],
            "gptcore.tokenizer_digest": meta["tokenizer_digest"], "gptcore.tokens_digest": meta.get("tokens_digest"),
            f"gptcore.metric.{metric}": value,
            "gptcore.parity": json.dumps(meta["parity"]), **source_tags()}
    # each precision variant ships in the version's package; its parity figures are on the version too
    tags["gptcore.variants"] = json.dumps({variant: {k: entry["parity"].get(k) for k in PARITY_TAG_FIELDS}
                                           for variant, entry in meta.get("variants", {}).items()})
    if kept:
        tags["gptcore.test_examples_digest"] = kept["examples_digest"]
        tags[PREDICTIONS_TAG] = f"evaluation/{kept['file']}"
    if scoring_reference is not None:
        tags[SCORING_REFERENCE_TAG] = f"evaluation/{scoring_reference.name}"
    if config is not None:
        tags["gptcore.config"] = json.dumps(config, sort_keys=True)[:5000]
    checkpoint = source_checkpoint(meta)
    if checkpoint is not None:
        tags[CHECKPOINT_TAG] = CHECKPOINT_ARTIFACT
    client = tracking.client()
    with stage_run(tracking, f"register_{meta['kind']}", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        logged = log_pyfunc(run, package_dir, meta)
        if checkpoint is not None:
            for file in CHECKPOINT_FILES:  # not `name`: that is the registered model's
                run.log_artifact(checkpoint / file, CHECKPOINT_ARTIFACT)
            run.log_artifact(Path(package_dir) / "tokenizer.json", CHECKPOINT_ARTIFACT)
        for evaluated in (predictions, scoring_reference):
            if evaluated is not None:
                run.log_artifact(str(evaluated), "evaluation")
        try:
            client.create_registered_model(name, description=f"gptcore {meta['kind']} (ONNX package)")
        except MlflowException:
            pass  # already registered
        # The source is where the model's files are, not models:/<model_id>: MLflow's SQL registry
        # resolves that through the process-wide tracking URI, not this client's.
        version = client.create_model_version(name, source=logged.artifact_location, run_id=run.run_id,
                                              tags={k: str(v) for k, v in tags.items()},
                                              model_id=logged.model_id).version
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion = current_champion(client, name)
        decision = decide(tracking, champion, metric, value, direction, predictions,
                          kept and kept["examples_digest"], gate, paired_gate)
        promoted, reason = decision.promote, decision.reason
        apply_decision(client, name, version, champion, decision)
        champion_version = version if promoted else champion.version
        run.log_metrics({metric: value, "promoted": float(promoted)})
        run.set_tags({"gptcore.registered_model": f"{name}/{version}", "gptcore.promotion": reason})
    log.info("register: %s v%s (%s %.4f): %s; champion is v%s (%s)", name, version, metric, value,
             "promoted" if promoted else "kept as challenger", champion_version, reason)
    return RegisterResult(name, str(version), metric, value, str(champion_version), promoted, reason)


def load_version_checkpoint(
    uri: str | Path, tracking_uri: str | None = None, registry_uri: str | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[GPTClassifier, dict[str, Any], Any]:
    """(classifier, model.json, tokenizer) from the torch checkpoint behind a registered version
    (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or in a local checkpoint directory.

    Weights load from safetensors only. A registered checkpoint carries its tokenizer; a directory
    without tokenizer.json takes `tokenizer` (a tokenizer.json), checked against the model's digest.
    """
    uri = str(uri)
    if not uri.startswith("models:/"):
        return _load_checkpoint_dir(Path(uri), tokenizer)
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        version = model_version(client, uri)
        what = f"{uri}: version {version.version} of {version.name!r}"
        if (kind := version.tags.get("gptcore.kind")) != "classifier":
            raise InputError(f"{what} is a {kind!r} model; explanations need a classifier")
        if (artifact := version.tags.get(CHECKPOINT_TAG)) is None:
            raise InputError(f"{what} has no torch checkpoint (tag {CHECKPOINT_TAG} missing: registered before "
                             "checkpoints were kept, or its checkpoint was gone); register the classifier again")
        with tempfile.TemporaryDirectory() as tmp:  # loaded into memory, so the download can go
            return _load_checkpoint_dir(Path(download_artifacts(run_id=version.run_id, artifact_path=artifact,
                                                                dst_path=tmp, tracking_uri=tracking_uri)), None)
    except MlflowException as e:
        raise InputError(f"{uri}: cannot be resolved: {e.message}") from None


def _load_checkpoint_dir(directory: Path, tokenizer: str | Path | None) -> tuple[GPTClassifier, dict[str, Any], Any]:
    from tokenizers import Tokenizer

    if not directory.is_dir():
        raise InputError(f"{directory}: no such checkpoint directory (or use models:/NAME@ALIAS or models:/NAME/VERSION)")
    model, meta = load_classifier(directory)
    path = directory / "tokenizer.json" if (directory / "tokenizer.json").is_file() else tokenizer
    if path is None or not Path(path).is_file():
        raise InputError(f"{directory}: no tokenizer.json here, and no tokenizer given ({path})")
    if sha256_file(path) != meta["tokenizer_digest"]:
        raise InputError(f"{path}: not the tokenizer {directory} was trained with (its digest differs)")
    return model, meta, Tokenizer.from_file(str(path))
