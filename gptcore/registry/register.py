"""Registration: an exported package becomes a version of its registered model, promoted by evidence.

Each registered version is an MLflow pyfunc model (`gptcore.runtime.pyfunc`, logged as models
from code: no pickle) that carries the self-contained model package (ONNX graph, tokenizer,
description) as its artifact `package`, so `mlflow.pyfunc.load_model` and `mlflow models serve`
generate and classify with it, and `gptcore.runtime.load_model` finds the package inside. It is
a LoggedModel named after its registered model, of the export run that wrote the package (the
version's source run; `gptcore.registry.lineage`), tagged with the data digest, tokenizer digest
and git commit, with the config as a file beside it and a description linking the runs that made
it. A new version gets the alias `challenger`; the first version is champion. Every version is
tagged with its parameter count; a compressed student (`gptcore.train.compress`) also with its
recipe (`gptcore.compression.*`) and takes an alias of its own name (`models:/NAME@p50-distilled`),
so a version can be served for its size and speed while the gate still judges it as any challenger.
A version takes `champion` through a paired-bootstrap gate (`gptcore.registry.promotion`) on the test
examples both versions were evaluated on: the classifier's per-passage predictions, the LM's
per-document bits per byte. Against a champion that kept no such evidence, it must beat the
champion's stored test metric (bits per byte, lower is better; macro-F1, higher). The decision
and its figures are tags on both versions.

A classifier version also keeps the torch checkpoint its package was exported from (safetensors,
model.json, tokenizer.json) in its source run, for `gptcore explain`, and its test documents'
probabilities as batch scoring reads them (the evaluation's scoring reference, tag
`gptcore.scoring_reference_artifact`), the drift monitor's reference (`gptcore.registry.score`).
Each is kept under `registrations/<digest>/`, the folder of its registration: another evaluation
of the same package makes another version from the same export run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from gptcore.config import RegistryConfig
from gptcore.errors import ConfigError, InputError
from gptcore.fsutil import sha256_file
from gptcore.layout import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_TAG,
    PREDICTIONS_TAG,
    REGISTRATION_DIGEST_TAG,
    SCORING_REFERENCE_TAG,
    TOKENIZER_FILE,
)
from gptcore.registry.gates import GateDecision, classifier_gate, lm_gate
from gptcore.registry.lineage import producing_runs, version_description
from gptcore.registry.promotion import AliasMovedError, apply_decision, current_champion, decide
from gptcore.results import load_export, read_eval
from gptcore.runtime.package import package_digest
from gptcore.tracking import Tracking, source_tags, stage_run

log = logging.getLogger("gptcore.registry")

CONFIG_TAG = "gptcore.config_artifact"  # the pipeline config a version was made with, as a file of its source run
VARIANT_TAG_PREFIX = "gptcore.variant."  # + fp32, fp16, int8: that variant's parity figures
PARITY_TAG_FIELDS = ("max_abs_logit_diff", "greedy_agreement", "greedy_tokens_equal")
CHECKPOINT_FILES = ("model.safetensors", "model.json")  # never state.pt: readers stay pickle-free
# kind -> (metric, direction, where the metric sits in the evaluation JSON)
PROMOTION_METRIC = {
    "lm": ("test_bpb", "min", ("test", "bpb")),
    "classifier": ("test_macro_f1", "max", ("test", "macro_f1")),
    "chat": ("test_response_bpb", "min", ("test", "response_bpb")),
}
# kind -> (the key of its per-example evidence in the evaluation's test section, the gate that pairs it)
# A chat model's documents are its held-out conversations: the LM's gate pairs their response bits per byte.
EVIDENCE = {
    "lm": ("documents", lm_gate),
    "chat": ("documents", lm_gate),
    "classifier": ("predictions", classifier_gate),
}
# Another registration or promotion moving the champion while this one decides: decide again against
# the new one, this many times at most.
DECIDE_ATTEMPTS = 3
PYFUNC_CODE = Path(__file__).parents[1] / "runtime" / "pyfunc_model.py"
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
    previous_champion_version: str | None = None  # the champion when this version was registered

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"


def pyfunc_requirements() -> list[str]:
    pins = []
    for package in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{package}=={installed_version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_pyfunc(client, run_id: str, name: str, package_dir: str | Path, meta: dict[str, Any]):
    """Log the package as an MLflow pyfunc LoggedModel `name` of run `run_id`; return the LoggedModel.

    Driven through the run's client like every other log call here: MLflow's fluent
    `log_model` would need the process-wide tracking URI and active run.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from gptcore.runtime.pyfunc import signature

    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, model_type=f"gptcore-{meta['kind']}"
    )
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example, on purpose: MLflow would load the model and run it to check one.
        warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            local,
            python_model=str(PYFUNC_CODE),
            artifacts={"package": str(package_dir)},
            signature=signature(meta),
            pip_requirements=pyfunc_requirements(),
            mlflow_model=Model(
                artifact_path=model.artifact_location,
                run_id=run_id,
                model_id=model.model_id,
                model_uuid=model.model_id,
            ),
        )
        client.log_model_artifacts(model.model_id, str(local))
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def compression_tags(recipe: dict[str, Any] | None) -> dict[str, Any]:
    """A compressed student's recipe on its version, one short tag per field (searchable)."""
    return {f"gptcore.compression.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in (recipe or {}).items()}


def source_checkpoint(meta: dict[str, Any]) -> Path | None:
    """The classifier checkpoint a package was exported from, if it is still there unchanged."""
    source = meta.get("checkpoint")
    if meta["kind"] != "classifier" or source is None:
        return None
    directory = Path(source["dir"])
    if not (directory / "model.safetensors").is_file():
        log.warning(
            "register: %s, the checkpoint the package was exported from, is gone: this version gets "
            "no torch checkpoint, so `gptcore explain` cannot explain it",
            directory,
        )
        return None
    if sha256_file(directory / "model.safetensors") != source["weights_sha256"]:
        raise InputError(
            f"{directory}: its weights changed since the package was exported from it "
            "(fine-tuned again?); run `gptcore export` again before registering"
        )
    return directory


def registered_version(client, name: str, digest: str) -> str | None:
    """The version of `name` registered from this package and this evaluation (by content), if any.

    Registering the same bytes again makes no second version: a pipeline killed inside `register`
    (before or after its MLflow run ended) takes its version up when it runs again."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{REGISTRATION_DIGEST_TAG}` = '{digest}'")
    return min((str(v.version) for v in found), key=int, default=None)


def new_version(
    client, source_run_id: str, name: str, package_dir, meta: dict, tags: dict, kept: dict, description: str
) -> str:
    """Log the package (as a pyfunc), and the files the version keeps beside it (`kept`: local file
    -> artifact directory), to its source run, and make them a new version."""
    from mlflow.exceptions import MlflowException

    logged = log_pyfunc(client, source_run_id, name, package_dir, meta)
    for path, directory in kept.items():
        client.log_artifact(source_run_id, str(path), directory)
    try:
        client.create_registered_model(name, description=f"gptcore {meta['kind']} (ONNX package)")
    except MlflowException:
        pass  # already registered
    # The source is where the model's files are, not models:/<model_id>: MLflow's SQL registry
    # resolves that through the process-wide tracking URI, not this client's.
    return client.create_model_version(
        name,
        source=logged.artifact_location,
        run_id=source_run_id,
        tags={k: str(v) for k, v in tags.items()},
        description=description,
        model_id=logged.model_id,
    ).version


def register(
    package_dir: str | Path,
    eval_path: str | Path,
    name: str,
    tracking: Tracking | None,
    config: dict[str, Any] | None = None,
    gate: RegistryConfig | None = None,
) -> RegisterResult:
    """Register the package in `package_dir` as a new version of `name`, and promote it if it wins."""
    if tracking is None:
        raise ConfigError("register: needs MLflow tracking settings (a registry to register into)")

    gate = gate or RegistryConfig()
    meta = load_export(package_dir)
    metric, direction, (section, key) = PROMOTION_METRIC[meta["kind"]]
    evaluation = read_eval(eval_path)
    value = float(evaluation[section][key])
    evidence, paired_gate = EVIDENCE[meta["kind"]]
    evidence_kept = evaluation[section].get(evidence)
    predictions = Path(eval_path).parent / evidence_kept["file"] if evidence_kept else None
    scoring_reference = evaluation[section].get("scoring_reference")  # a classifier's, evaluated since it was kept
    scoring_reference = Path(eval_path).parent / scoring_reference["file"] if scoring_reference else None
    digest = package_digest(Path(package_dir))
    registration = hashlib.sha256(f"{digest} {sha256_file(eval_path)}".encode()).hexdigest()
    # What the version keeps beside its model, in its source run, under a folder of this registration:
    # another evaluation of the same package registers another version from the same export run.
    folder = f"registrations/{registration[:16]}"
    kept: dict[Path, str] = {}
    tags = {
        REGISTRATION_DIGEST_TAG: registration,
        "gptcore.kind": meta["kind"],
        "gptcore.data_digest": meta["data_digest"],
        "gptcore.tokenizer_digest": meta["tokenizer_digest"],
        "gptcore.tokens_digest": meta.get("tokens_digest"),
        f"gptcore.metric.{metric}": value,
        "gptcore.num_params": meta.get("num_params"),  # to choose a version by size, not only by quality
        **compression_tags(meta.get("compression")),
        **source_tags(),
    }
    # each precision variant ships in the version's package; its parity figures are on the version
    # too, one short tag per variant (3 significant digits)
    for variant, entry in meta.get("variants", {}).items():
        figures = {k: entry["parity"].get(k) for k in PARITY_TAG_FIELDS}
        tags[f"{VARIANT_TAG_PREFIX}{variant}"] = json.dumps(
            {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in figures.items()}
        )
    if evidence_kept:
        tags["gptcore.test_examples_digest"] = evidence_kept["examples_digest"]
        tags[PREDICTIONS_TAG] = f"{folder}/evaluation/{predictions.name}"
        kept[predictions] = f"{folder}/evaluation"
    if scoring_reference is not None:
        tags[SCORING_REFERENCE_TAG] = f"{folder}/evaluation/{scoring_reference.name}"
        kept[scoring_reference] = f"{folder}/evaluation"
    checkpoint = source_checkpoint(meta)
    if checkpoint is not None:
        tags[CHECKPOINT_TAG] = f"{folder}/{CHECKPOINT_ARTIFACT}"
        for file in (*(checkpoint / f for f in CHECKPOINT_FILES), Path(package_dir) / TOKENIZER_FILE):
            kept[file] = tags[CHECKPOINT_TAG]
    client = tracking.client()
    with stage_run(tracking, f"register_{meta['kind']}", tags={"gptcore.data_digest": meta["data_digest"]}) as run:
        version = registered_version(client, name, registration)
        if version is not None:
            log.info("register: %s v%s holds this package and evaluation already: deciding on it", name, version)
        else:
            runs = producing_runs(tracking, tracking.experiment_id(), meta["kind"], digest)
            source_run_id = runs["exported"].info.run_id if "exported" in runs else run.run_id
            if config is not None:  # the whole config, as a file: as a tag it would bury the others
                tags[CONFIG_TAG] = f"{folder}/config.json"
                client.log_dict(source_run_id, config, tags[CONFIG_TAG])
            runs["registered"] = client.get_run(run.run_id)
            description = version_description(meta["kind"], metric, value, meta, runs)
            version = new_version(client, source_run_id, name, package_dir, meta, tags, kept, description)
        client.set_registered_model_alias(name, CHALLENGER, version)
        if meta.get("compression"):  # models:/NAME@p50-distilled: the newest version of that student
            client.set_registered_model_alias(name, meta["compression"]["student"], version)
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            champion = current_champion(client, name)
            if champion is not None and str(champion.version) == str(version):
                decision = GateDecision(True, f"v{version} is already the champion")
                break
            decision = decide(
                tracking,
                champion,
                metric,
                value,
                direction,
                predictions,
                evidence_kept and evidence_kept["examples_digest"],
                gate,
                paired_gate,
            )
            try:
                apply_decision(client, name, version, champion, decision)
                break
            except AliasMovedError as e:
                if attempt == DECIDE_ATTEMPTS:
                    raise
                log.warning("register: %s; deciding again", e)  # deciding costs seconds, not an evaluation
        promoted, reason = decision.promote, decision.reason
        champion_version = version if promoted else champion.version
        run.log_metrics({f"registry/{metric}": value, "registry/promoted": float(promoted)})
        run.set_tags({"gptcore.registered_model": f"{name}/{version}", "gptcore.promotion": reason})
    log.info(
        "register: %s v%s (%s %.4f): %s; champion is v%s (%s)",
        name,
        version,
        metric,
        value,
        "promoted" if promoted else "kept as challenger",
        champion_version,
        reason,
    )
    return RegisterResult(
        name,
        str(version),
        metric,
        value,
        str(champion_version),
        promoted,
        reason,
        None if champion is None else str(champion.version),
    )
