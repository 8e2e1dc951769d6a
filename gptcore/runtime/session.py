"""ONNX Runtime sessions: CUDA when it is there (and said so), CPU otherwise."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gptcore.errors import GptcoreError

log = logging.getLogger("gptcore.runtime")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def nvidia_driver() -> bool:
    """Whether an NVIDIA driver is loaded: onnxruntime-gpu lists CUDA as available even where none is."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def make_session(onnx_path: str | Path, device: str = "auto", threads: int | None = None):
    """An InferenceSession on `device`: `auto` (CUDA if available), `cuda` (required) or `cpu`."""
    import onnxruntime as ort

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device: must be auto, cuda or cpu, got {device!r}")
    if device != "cpu" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # loads CUDA/cuDNN from pip-installed nvidia-* wheels when present
        except Exception as e:  # a failed preload is reported below, as the provider missing
            log.debug("onnxruntime.preload_dlls() failed: %s", e)
    wants_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers() and nvidia_driver())
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    active = session.get_providers()
    if device == "cuda" and CUDA not in active:
        raise GptcoreError(
            f"{onnx_path}: CUDAExecutionProvider was asked for but could not load (available: "
            f"{ort.get_available_providers()}); the CUDA or cuDNN libraries onnxruntime-gpu needs are missing "
            "or do not match its build. Install them (e.g. pip install 'onnxruntime-gpu[cuda,cudnn]') or use device='cpu'."
        )
    if wants_cuda and CUDA not in active:
        log.warning("%s: CUDAExecutionProvider is listed but did not load; running on CPU", onnx_path)
    log.info("%s: ONNX Runtime session on %s", Path(onnx_path).name, active[0])
    return session
