"""Runtime and memory measurements shared by the trainer, the nodes and the benchmarks."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM, the peak of this address space. ru_maxrss would carry a parent's peak across execve.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """CUDA peak allocated memory for a CUDA device, else the process's peak RSS."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_peak_rss_mb()


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new CUDA peak window (process RSS peaks cannot be reset)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Timing:
    seconds: float = 0.0  # wall time of the block
    peak_mb: float = 0.0  # peak memory at its end (see peak_memory_mb)


@contextmanager
def measure(device: torch.device | str | None = None):
    """`with measure(dev) as t: ...` fills t.seconds and t.peak_mb; synchronises CUDA so times are real."""
    result = Timing()
    dev = torch.device(device) if device is not None else None
    reset_peak_memory(dev)
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    try:
        yield result
    finally:
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.seconds = time.perf_counter() - start
        result.peak_mb = peak_memory_mb(dev)
