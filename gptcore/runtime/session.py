"""ONNX Runtime sessions: CUDA where it is asked for or really usable, CPU otherwise.

A graph file is untrusted: ONNX Runtime opens, in C++ and out of Python's sight, every file its
tensors name as external data. Before a session is made, every such location is read from the
file (`external_data_locations`) and must resolve inside the graph's directory: onnxruntime
checks that itself only from 1.24.1 on, and not the same way in every release since.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptcore.errors import GptcoreError, InputError
from gptcore.runtime.package import file_inside

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


# The ONNX protobuf fields on the way from a ModelProto to each TensorProto (message -> field
# number -> message it holds); a TensorProto's external_data (13) entries are key (1) / value (2).
MODEL, GRAPH, TRAINING, FUNCTION, NODE, ATTRIBUTE, SPARSE, TENSOR = range(8)
TENSOR_PATHS = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    FUNCTION: {7: NODE, 11: ATTRIBUTE},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
}
EXTERNAL_DATA, KEY, VALUE = 13, 1, 2
MAX_NESTING = 64  # subgraphs in subgraphs; a real graph nests a few levels


class MalformedGraph(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedGraph("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(data, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in data[start:end];
    the other wire types are skipped."""
    pos = start
    while pos < end:
        tag = data[pos]
        if tag < 0x80:  # one-byte tags (field numbers below 16) are nearly all of them
            pos += 1
        else:
            tag, pos = varint(data, pos, end)
        wire = tag & 7
        if wire == 2:
            length, pos = varint(data, pos, end)
            if pos + length > end:
                raise MalformedGraph("a field runs past its message")
            yield tag >> 3, pos, pos + length
            pos += length
        elif wire == 0:
            _, pos = varint(data, pos, end)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise MalformedGraph(f"wire type {wire}")
    if pos != end:
        raise MalformedGraph("a field runs past its message")


def locations_in(data, start: int, end: int, message: int, depth: int) -> Iterator[str]:
    if depth > MAX_NESTING:
        raise MalformedGraph(f"nested deeper than {MAX_NESTING}")
    for number, begin, stop in fields(data, start, end):
        if message == TENSOR:
            if number == EXTERNAL_DATA:
                entry = {key: bytes(data[b:e]) for key, b, e in fields(data, begin, stop) if key in (KEY, VALUE)}
                if entry.get(KEY) == b"location":
                    yield entry.get(VALUE, b"").decode("utf-8", "replace")
        elif number in TENSOR_PATHS[message]:
            yield from locations_in(data, begin, stop, TENSOR_PATHS[message][number], depth + 1)


def external_data_locations(onnx_path: Path) -> list[str]:
    """Every external-data location the graph's tensors name (initializers, constants, subgraphs,
    functions), read from the protobuf wire format through mmap: the weights are skipped, not
    parsed or copied (5 ms on a 400 MB graph, where `onnx.load(load_external_data=False)` takes
    0.4 s and a second copy of the weights in memory)."""
    with open(onnx_path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise InputError(f"{onnx_path}: empty, not an ONNX graph")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return list(locations_in(data, 0, len(data), MODEL, 0))
            except MalformedGraph as e:
                raise InputError(f"{onnx_path}: not a readable ONNX graph ({e})") from None


def check_external_data(onnx_path: Path) -> None:
    """Refuse a graph naming external data that is not a regular file beside it or below it."""
    root = Path(os.path.realpath(onnx_path.parent))
    for location in external_data_locations(onnx_path):
        file_inside(root, location, f"{onnx_path}: external data location")


def make_session(onnx_path: str | Path, options: SessionOptions | None = None):
    """An `onnxruntime.InferenceSession` for `onnx_path` as `options` say, once every file the graph
    names is known to be inside its directory."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    check_external_data(onnx_path)
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
        raise InputError(f"{onnx_path}: ONNX Runtime cannot load this graph: {e}") from None
    active = session.get_providers()
    if options.device == "cuda" and CUDA not in active:
        raise GptcoreError(f"{cuda_failure(onnx_path, preload_error)}. {USE_CPU}")
    if cuda and CUDA not in active:
        log.warning("%s; running on CPU", cuda_failure(onnx_path, preload_error))
    log.info("%s: ONNX Runtime session on %s", Path(onnx_path).name, active[0])
    return session
