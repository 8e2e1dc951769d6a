"""Throughput figures: model FLOPs utilisation against the device's peak, and peak memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """FLOP/s the device peaks at in bf16, or None where unknown (CPUs): MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for chip, tflops in PEAK_BF16_TFLOPS.items():
        if chip in name:
            return tflops * 1e12
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
