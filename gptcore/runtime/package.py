"""A model package: the directory `gptcore.export` writes and the registry stores.

    model.onnx  tokenizer.json  gptcore_model.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.errors import InputError
from gptcore.fsutil import read_json

FORMAT_VERSION = 1
KINDS = ("lm", "classifier")
FILES = ("model.onnx", "tokenizer.json", "gptcore_model.json")


@dataclass
class ModelPackage:
    path: Path
    meta: dict[str, Any]
    tokenizer: Any  # tokenizers.Tokenizer

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"


def load_package(path: str | Path) -> ModelPackage:
    from tokenizers import Tokenizer

    path = Path(path)
    for name in FILES:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: missing; {path} is not a gptcore model package")
    meta = read_json(path / "gptcore_model.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path / 'gptcore_model.json'}: format_version {meta.get('format_version')!r}, "
                         f"this runtime reads {FORMAT_VERSION}")
    if meta.get("kind") not in KINDS:
        raise InputError(f"{path / 'gptcore_model.json'}: unknown kind {meta.get('kind')!r}; known: {KINDS}")
    return ModelPackage(path, meta, Tokenizer.from_file(str(path / "tokenizer.json")))


def resolve_model_uri(uri: str | Path, tracking_uri: str | None = None) -> Path:
    """A local package directory for `uri`: a path, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/...`.

    Registry URIs are resolved with an explicit client, so `tracking_uri` (default: MLflow's
    own resolution, e.g. MLFLOW_TRACKING_URI) decides which registry is asked.
    """
    uri = str(uri)
    if uri.startswith("models:/"):
        from mlflow import MlflowClient
        from mlflow.artifacts import download_artifacts

        client = MlflowClient(tracking_uri=tracking_uri)
        name, _, ref = uri[len("models:/") :].partition("@")
        if ref:
            version = client.get_model_version_by_alias(name, ref).version
        else:
            name, _, version = name.partition("/")
            if not version:
                raise InputError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        source = client.get_model_version_download_uri(name, str(version))
        return Path(download_artifacts(artifact_uri=source, tracking_uri=tracking_uri))
    if uri.startswith("runs:/"):
        from mlflow.artifacts import download_artifacts

        return Path(download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    path = Path(uri)
    if not path.is_dir():
        raise InputError(f"{uri}: no such model package directory (or use models:/NAME@ALIAS)")
    return path
