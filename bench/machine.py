"""What a benchmark ran on, written into every benchmark's JSON beside its figures.

Figures on these machines move by ±2× from day to day and with the CPU model and its vector
extensions (int8 decoding gained 2.7× over torch on an AVX2-only CPU, 4.8× on another): a figure
is only comparable with those measured in the same run, on the machine recorded here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# The instruction-set extensions that decide how fast matmuls run here (x86 and Arm names).
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "bf16",
    "i8mm",
)


def cpu() -> dict[str, Any]:
    """The CPU model, its logical cores and the ISA extensions it reports (Linux's /proc/cpuinfo)."""
    models, flags = [], set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):
                    models.append(value.strip())
                elif key.strip() in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    model = models[0] if models else platform.processor() or platform.machine()
    return {"model": model, "logical_cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}


def describe() -> dict[str, Any]:
    """The machine and the software a benchmark ran on."""
    packages = {}
    for name in ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "tokenizers", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    gpu, providers = None, None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()  # the CUDA provider only in onnxruntime-gpu
    except ImportError:
        pass
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu(),
        "gpu": gpu,
        "onnxruntime_providers": providers,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "load_average": os.getloadavg(),
    }


def write_json(path: Path, results: Any) -> None:
    """`results` with the machine they were measured on: {"machine": ..., "results": ...}."""
    Path(path).write_text(json.dumps({"machine": describe(), "results": results}, indent=2) + "\n")
