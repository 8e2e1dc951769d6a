"""A model package: the directory `gptcore.export.package` writes and the registry stores.

    model.onnx  tokenizer.json  gptcore_model.json   [model.fp16.onnx  model.int8.onnx]

`gptcore_model.json` lists the precision variants the package holds, each with its parity
figures; a package without that list holds the fp32 graph alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.errors import InputError
from gptcore.fsutil import read_json
from gptcore.runtime.template import CHAT_TOKENS

# 2: the LM graph takes logit_positions, and variants are listed; 3: its cache is written in place
FORMAT_VERSIONS = (1, 2, 3)
KINDS = ("lm", "classifier", "chat")
FILES = ("model.onnx", "tokenizer.json", "gptcore_model.json")
INT_FIELDS = ("block_size", "n_layer", "n_head", "head_dim", "vocab_size", "eos_token_id", "pad_token_id")


@dataclass
class ModelPackage:
    path: Path
    kind: str  # "lm", "classifier" or "chat"
    meta: dict[str, Any]  # gptcore_model.json
    tokenizer: Any  # tokenizers.Tokenizer

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """variant -> {"file", "parity"}: fp32 always, fp16 and int8 where the export kept them."""
        return self.meta.get("variants") or {"fp32": {"file": "model.onnx", "parity": self.meta.get("parity", {})}}

    def choose_variant(self, variant: str, on_cuda: bool) -> str:
        """`variant`, checked; "auto" is fp16 on CUDA where the package has it, else fp32 (exact)."""
        if variant == "auto":
            return "fp16" if on_cuda and "fp16" in self.variants else "fp32"
        if variant not in self.variants:
            raise InputError(f"{self.path}: has no {variant!r} variant (it has: {', '.join(self.variants)})")
        return variant

    def variant_path(self, variant: str) -> Path:
        return self.path / self.variants[variant]["file"]


def check_meta(meta: Any, where: Path) -> None:
    """Refuse a description this runtime would misread, naming the field."""
    if not isinstance(meta, dict):
        raise InputError(f"{where}: expected a JSON object")
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise InputError(
            f"{where}: format_version {meta.get('format_version')!r}; this runtime reads "
            f"{', '.join(map(str, FORMAT_VERSIONS))}"
        )
    if meta.get("kind") not in KINDS:
        raise InputError(f"{where}: unknown kind {meta.get('kind')!r}; known: {', '.join(KINDS)}")
    for field in INT_FIELDS:
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{where}: field {field!r} must be a non-negative integer, got {value!r}")
    if meta["kind"] == "classifier":
        labels = meta.get("labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise InputError(f"{where}: field 'labels' must be a non-empty list of strings, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise InputError(f"{where}: field 'labels' repeats a label: {labels}")
    if meta["kind"] == "chat":
        check_chat(meta, where)
    variants = meta.get("variants", {})
    if not isinstance(variants, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("file"), str) and "/" not in v["file"] for v in variants.values()
    ):
        raise InputError(f"{where}: field 'variants' must map each variant to {{'file': NAME, ...}}, got {variants!r}")
    if variants and "fp32" not in variants:
        raise InputError(f"{where}: field 'variants' lacks fp32 (the graph every package has), got {list(variants)}")


def check_chat(meta: dict, where: Path) -> None:
    """A chat package names the id of each of the template's tokens, inside the vocabulary, each its own."""
    tokens = meta.get("chat", {}).get("tokens") if isinstance(meta.get("chat"), dict) else None
    ids = [tokens.get(t) for t in CHAT_TOKENS] if isinstance(tokens, dict) else []
    if not (
        len(ids) == len(CHAT_TOKENS)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < meta["vocab_size"] for i in ids)
        and len(set(ids)) == len(ids)
    ):
        raise InputError(
            f"{where}: field 'chat.tokens' must map each of {', '.join(CHAT_TOKENS)} to its own token id "
            f"below vocab_size {meta['vocab_size']}, got {tokens!r}"
        )


def load_package(path: str | Path) -> ModelPackage:
    """The package in directory `path`, checked: its files exist and its description is readable."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such model package directory")
    for name in FILES:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: missing; {path} is not a complete gptcore model package")
    meta_path = path / "gptcore_model.json"
    try:
        meta = read_json(meta_path)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{meta_path}: not valid JSON: {e}") from None
    check_meta(meta, meta_path)
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise InputError(f"{path / 'tokenizer.json'}: cannot be loaded as a tokenizer: {e}") from None
    package = ModelPackage(path, meta["kind"], meta, tokenizer)
    for variant in package.variants:
        if not package.variant_path(variant).is_file():
            raise InputError(f"{package.variant_path(variant)}: missing; {meta_path} lists it as the {variant} variant")
    return package


def resolve_model_uri(uri: str | Path, tracking_uri: str | None = None, registry_uri: str | None = None) -> Path:
    """A local package directory for `uri`: a path, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/...`.

    Registry and run URIs are downloaded from MLflow: `tracking_uri` (default: MLflow's own
    resolution, e.g. MLFLOW_TRACKING_URI) and `registry_uri` (default: the tracking URI) say which
    server. A local path is returned as is, or the package inside it where it is a gptcore pyfunc
    model directory.
    """
    uri = str(uri)
    if uri.startswith(("models:/", "runs:/")):
        return download_package(uri, tracking_uri, registry_uri or tracking_uri)
    path = Path(uri)
    if not path.is_dir():
        raise InputError(f"{uri}: no such model package directory (or use models:/NAME@ALIAS or runs:/RUN_ID/PATH)")
    return package_in(path)


def download_package(uri: str, tracking_uri: str | None, registry_uri: str | None) -> Path:
    # MLflow is imported here only: serving from a local directory must not need it.
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("runs:/"):
            return package_in(Path(download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)))
        # A models:/ URI handed to download_artifacts also drops MLflow's registered_model_meta
        # file into the download; downloading the version's source gives exactly the model.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        version = model_version(client, uri)
        source = client.get_model_version_download_uri(version.name, version.version)
        return package_in(Path(download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)))
    except MlflowException as e:
        raise InputError(f"{uri}: cannot be resolved: {e.message}") from None


def package_in(directory: Path) -> Path:
    """The package in `directory`: the directory itself, or the `package` artifact of the gptcore
    pyfunc model there (what the registry logs; versions registered before that are bare packages)."""
    mlmodel = directory / "MLmodel"
    if not mlmodel.is_file():
        return directory
    import yaml

    try:
        flavor = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))["flavors"]["python_function"]
        return directory / flavor["artifacts"]["package"]["path"]
    except (yaml.YAMLError, TypeError, KeyError):
        raise InputError(
            f"{mlmodel}: an MLflow model, but not a gptcore pyfunc model (no pyfunc "
            "artifact 'package'); give a gptcore model package or a version gptcore registered"
        ) from None


def model_version(client, uri: str):
    """The registered version (an MLflow ModelVersion) that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
    name, _, alias = uri[len("models:/") :].partition("@")
    if alias:
        return client.get_model_version_by_alias(name, alias)
    name, _, version = name.partition("/")
    if not name or not version:
        raise InputError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, version)
