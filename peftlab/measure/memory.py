"""Peak memory of the running process: RSS on CPU, max allocated on CUDA, current allocated on MPS."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_bytes() -> int:
    """This program's peak resident set size so far. On Linux from /proc (VmHWM): getrusage's ru_maxrss
    survives execve, so a child started by a big parent would report the parent's peak as its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return peak_rss_bytes()
