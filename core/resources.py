"""Runtime and memory measurements shared by the trainer, the nodes and the benchmarks."""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_write_text


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


def write_resource_record(output: str | Path, record: dict) -> Path:
    """`<output stem>.resources.json` beside a trained artifact: what it cost to make (time, memory, size)."""
    output = Path(output)
    record = {"artifact": output.name, "bytes": output.stat().st_size if output.exists() else None, **record}
    path = output.parent / f"{output.stem}.resources.json"
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def cost_table(records: list[dict]) -> str:
    """A Markdown table comparing resource records (e.g. a LoRA style against its DreamBooth baseline).
    Run time is the whole run (model loading, latent caching, class images included)."""
    head = "| artifact | kind | steps | run time | s/step | peak memory | file size | device |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in records:
        steps = int(r.get("steps") or 0)
        secs = float(r.get("train_seconds") or 0)
        size = f"{r['bytes'] / 1e6:.1f} MB" if r.get("bytes") is not None else "n/a"
        # s/step from the optimizer loop alone (loading, caching and class images excluded) when recorded.
        loop = r.get("loop_seconds")
        ran = steps - int(r.get("resumed_from") or 0)
        per_step = f"{loop / ran:.2f}" if loop and ran > 0 else f"{secs / steps:.2f}" if steps else "n/a"
        peak = float(r.get("peak_memory_mb") or 0)
        lines.append(f"| {r.get('artifact', '?')} | {r.get('kind', '?')} | {steps} | {secs / 60:.1f} min | "
                     f"{per_step} | {peak:.0f} MB | {size} | {r.get('device', '?')} |")
    return "\n".join(lines) + "\n"
