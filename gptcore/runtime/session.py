"""ONNX Runtime sessions: CUDA where it is asked for or really usable, CPU otherwise."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gptcore.errors import GptcoreError

log = logging.getLogger("gptcore.runtime")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
USE_CPU = "Or use device='cpu'."
DEVICES = ("auto", "cuda", "cpu")
# What onnxruntime-gpu's CUDA provider loads (CUDA 12 builds); named in the error when one is missing.
CUDA_LIBRARIES = (
    "libcudart.so.12",
    "libcublas.so.12",
    "libcublasLt.so.12",
    "libcufft.so.11",
    "libcurand.so.10",
    "libcudnn.so.9",
)


@dataclass(frozen=True)
class SessionOptions:
    """How sessions run: device, CPU threads and the CUDA provider's options."""

    device: str = "auto"
    """auto (CUDA if it is usable, else CPU), cuda (required: fail if it cannot load) or cpu."""
    threads: int | None = None
    """CPU threads within an op (intra-op); None: ONNX Runtime's default (all physical cores)."""
    device_id: int = 0
    """The GPU to run on."""
    gpu_mem_limit: int | None = None
    """Bytes the CUDA memory arena may grow to; None: no limit."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")
        if self.device_id < 0:
            raise ValueError(f"device_id: must be >= 0, got {self.device_id}")
        if self.gpu_mem_limit is not None and self.gpu_mem_limit < 1:
            raise ValueError(f"gpu_mem_limit: must be a positive number of bytes or None, got {self.gpu_mem_limit}")


def nvidia_driver_loaded() -> bool:
    """Whether an NVIDIA driver is loaded (assumed off Linux, where we cannot cheaply tell).

    onnxruntime-gpu lists CUDA as available on machines without a GPU too; trying it there only
    buys a loud failed load before the fall back to CPU.
    """
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def missing_cuda_libraries() -> list[str]:
    """The CUDA/cuDNN shared libraries that cannot be loaded from here (Linux only)."""
    if not sys.platform.startswith("linux"):
        return []
    missing = []
    for name in CUDA_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def preload_cuda() -> str | None:
    """Load CUDA/cuDNN from the nvidia-* pip wheels where installed; the error, if any."""
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        return "this onnxruntime has no preload_dlls()"
    try:
        ort.preload_dlls()
    except Exception as e:  # reported with the reason the provider did not load
        return f"onnxruntime.preload_dlls() failed: {e}"
    return None


def cuda_failure(onnx_path: str | Path, preload_error: str | None) -> str:
    import onnxruntime as ort

    reasons = []
    if CUDA not in ort.get_available_providers():
        reasons.append(
            f"this onnxruntime build has no CUDA provider (it lists {ort.get_available_providers()}; "
            "install onnxruntime-gpu, and not onnxruntime beside it)"
        )
    if not nvidia_driver_loaded():
        reasons.append("no NVIDIA driver is loaded (no /proc/driver/nvidia/version): no GPU here")
    missing = missing_cuda_libraries()
    if missing:
        reasons.append(
            f"these libraries cannot be loaded: {', '.join(missing)} "
            "(pip install 'onnxruntime-gpu[cuda,cudnn]', or put the CUDA 12 and cuDNN 9 libraries "
            "on LD_LIBRARY_PATH)"
        )
    if preload_error:
        reasons.append(preload_error)
    reason = "; ".join(reasons) or "ONNX Runtime's log above says why"
    return f"{onnx_path}: CUDAExecutionProvider was asked for but could not load: {reason}"


def wants_cuda(device: str) -> bool:
    import onnxruntime as ort

    return device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers() and nvidia_driver_loaded())


def make_session(onnx_path: str | Path, options: SessionOptions | None = None):
    """An `onnxruntime.InferenceSession` for `onnx_path` as `options` say."""
    import onnxruntime as ort

    options = options or SessionOptions()
    cuda = wants_cuda(options.device)
    preload_error = preload_cuda() if cuda else None
    session_options = ort.SessionOptions()
    if options.threads is not None:
        session_options.intra_op_num_threads = options.threads
    providers: list = [CPU]
    if cuda:
        cuda_options = {"device_id": options.device_id}
        if options.gpu_mem_limit is not None:
            cuda_options |= {"gpu_mem_limit": options.gpu_mem_limit, "arena_extend_strategy": "kSameAsRequested"}
        providers = [(CUDA, cuda_options), CPU]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=session_options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
        if options.device == "cuda":
            raise GptcoreError(f"{cuda_failure(onnx_path, preload_error)} (ONNX Runtime: {e}). {USE_CPU}") from None
        raise
    active = session.get_providers()
    if options.device == "cuda" and CUDA not in active:
        raise GptcoreError(f"{cuda_failure(onnx_path, preload_error)}. {USE_CPU}")
    if cuda and CUDA not in active:
        log.warning("%s; running on CPU", cuda_failure(onnx_path, preload_error))
    log.info("%s: ONNX Runtime session on %s", Path(onnx_path).name, active[0])
    return session
