"""A training run's loss curve: the loss log `<output stem>.train_log.csv` (written by trainer.loop.TrainProgress:
the mean loss of each logging window) read back and drawn as `<output stem>.loss_curve.png` beside the output."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from ..core.files import atomic_write

logger = logging.getLogger(__name__)


def loss_log_path(output: Path) -> Path:
    """The loss log (CSV) of the run that writes `output`."""
    return output.parent / f"{output.stem}.train_log.csv"


def loss_curve_path(output: Path) -> Path:
    """The loss-curve plot (PNG) of the run that writes `output`."""
    return output.parent / f"{output.stem}.loss_curve.png"


def read_loss_log(path: Path) -> tuple[list[int], list[float]]:
    """(steps, mean losses) of a loss log, in step order; rows without a step or a finite loss are left out."""
    steps, losses = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step, loss = int(row["step"]), float(row["loss"])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(loss):
                steps.append(step)
                losses.append(loss)
    order = sorted(range(len(steps)), key=steps.__getitem__)
    return [steps[i] for i in order], [losses[i] for i in order]


def write_loss_curve(output: Path, title: str) -> Path | None:
    """Draw the loss log of `output`'s run as `<output stem>.loss_curve.png` (written atomically) and return its
    path; None, with a warning, when the log is missing or has no finite loss. The CSV is kept."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: a training server or CI has none
    import matplotlib.pyplot as plt

    log = loss_log_path(output)
    if not log.is_file():
        logger.warning("no loss log %s: no loss curve drawn", log)
        return None
    steps, losses = read_loss_log(log)
    if not steps:
        logger.warning("loss log %s has no finite loss: no loss curve drawn", log)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, losses, "o-" if len(steps) < 30 else "-", color="#4c72b0", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over the logging window)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = loss_curve_path(output)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
