"""ONNX Runtime sessions: CUDA where it is asked for or really usable, CPU otherwise."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from gptcore.errors import GptcoreError

log = logging.getLogger("gptcore.runtime")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def nvidia_driver_loaded() -> bool:
    """Whether an NVIDIA driver is loaded (assumed off Linux, where we cannot cheaply tell).

    onnxruntime-gpu lists CUDA as available on machines without a GPU too; trying it there only
    buys a loud failed load before the fall back to CPU.
    """
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def make_session(onnx_path: str | Path, device: str = "auto", threads: int | None = None):
    """An `onnxruntime.InferenceSession` on `device`: auto (CUDA if usable), cuda (required) or cpu."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {device!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    wants_cuda = device == "cuda" or (
        device == "auto" and CUDA in ort.get_available_providers() and nvidia_driver_loaded()
    )
    if wants_cuda and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip wheels, when those are installed
        except Exception as e:  # a failed preload shows up below as the provider not loading
            log.debug("onnxruntime.preload_dlls() failed: %s", e)

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)

    active = session.get_providers()
    if device == "cuda" and CUDA not in active:
        raise GptcoreError(
            f"{onnx_path}: CUDAExecutionProvider was asked for but could not load (onnxruntime lists "
            f"{ort.get_available_providers()}): the CUDA or cuDNN libraries onnxruntime-gpu needs are "
            "missing or do not match its build, or there is no GPU. Install them (e.g. "
            "pip install 'onnxruntime-gpu[cuda,cudnn]') or use device='cpu'."
        )
    if wants_cuda and CUDA not in active:
        log.warning("%s: CUDAExecutionProvider is listed but did not load; running on CPU", onnx_path)
    log.info("%s: ONNX Runtime session on %s", Path(onnx_path).name, active[0])
    return session
