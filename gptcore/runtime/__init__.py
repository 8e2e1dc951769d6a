"""Torch-free inference over gptcore's ONNX model packages: onnxruntime, tokenizers, numpy, pyarrow.

Downstream apps and batch jobs import this without torch, Prefect or datasets installed; MLflow
is imported only to resolve a `models:/` or `runs:/` URI.

    from gptcore.runtime import load_model
    lm = load_model("models:/gptcore-lm@champion")
    lm.generate("ROMEO.", max_new_tokens=64, seed=0)
    bot = load_model("models:/gptcore-chat@champion")
    bot.chat([{"role": "user", "content": "Who's there?"}], max_new_tokens=64, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from gptcore.runtime.batch import score_file
from gptcore.runtime.chat import OnnxChat
from gptcore.runtime.classifier import OnnxClassifier
from gptcore.runtime.lm import OnnxLM
from gptcore.runtime.package import ModelPackage, load_package, resolve_model_uri
from gptcore.runtime.session import SessionOptions


def load_model(
    uri_or_path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    variant: str = "auto",
    device_id: int = 0,
    gpu_mem_limit: int | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    download_dir: Path | None = None,
) -> OnnxLM | OnnxChat | OnnxClassifier:
    """The model behind a package directory or MLflow URI: an `OnnxLM`, `OnnxChat` or `OnnxClassifier`, by its kind.

    device: auto | cuda | cpu; threads: CPU intra-op threads; variant: auto (fp16 on CUDA where
    the package has it, else fp32), fp32, fp16 or int8; device_id and gpu_mem_limit (bytes): the
    CUDA provider's options; download_dir: where a registry or run URI is downloaded (the caller
    removes it), else a temporary directory of MLflow's.
    """
    package = load_package(resolve_model_uri(uri_or_path, tracking_uri, registry_uri, download_dir))
    model_class = {"lm": OnnxLM, "chat": OnnxChat, "classifier": OnnxClassifier}[package.kind]
    return model_class(package, SessionOptions(device, threads, device_id, gpu_mem_limit), variant)


__all__ = [
    "ModelPackage",
    "OnnxChat",
    "OnnxClassifier",
    "OnnxLM",
    "SessionOptions",
    "load_model",
    "load_package",
    "resolve_model_uri",
    "score_file",
]
