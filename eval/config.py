"""`EvalConfig`, the settings of `stylora eval` (the metric names come from eval/registry.py): kept free of torch
so that the command line builds its parser without loading the feature networks' libraries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .registry import ALL_METRICS, KID_SUBSET_SIZE, KID_SUBSETS, check_names


@dataclass(frozen=True)
class EvalConfig:
    content: str = field(metadata={"help": "folder of content photos"})
    styled: tuple[str, ...] = field(
        metadata={"help": "folders of stylised outputs, paired with content photos by file stem"})
    out: str = field(metadata={"help": "folder for the report"})
    style: str | None = field(
        default=None, metadata={"help": "folder of style images (needed for lpips_style, gram, fid, kid, artfid)"})
    names: tuple[str, ...] = field(
        default=(), metadata={"help": "a label per styled folder; default: the folder names"})
    metrics: tuple[str, ...] = field(default=ALL_METRICS, metadata={"help": "which metrics to compute"})
    resize_content: bool = field(
        default=False,
        metadata={"help": "resize a content photo to its output's size when they differ (else: an error row)"})
    style_max_side: int = field(
        default=512, metadata={"help": "style images are scaled down to this longest side for Gram statistics"})
    kid_subsets: int = field(default=KID_SUBSETS, metadata={"help": "KID: number of random subsets"})
    kid_subset_size: int = field(
        default=KID_SUBSET_SIZE, metadata={"help": "KID: subset size (capped by the set sizes)"})
    grid_rows: int = field(default=6, metadata={"help": "rows of the content | style | output grid"})
    device: str | None = field(default=None, metadata={"help": "\"cuda\", \"cpu\"; None picks CUDA when available"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "style-set Inception feature cache; None: ~/.cache/stylora/features"})

    def __post_init__(self) -> None:
        check_names(self.metrics, "metrics")
        if not self.styled:
            raise ValueError("styled: give at least one folder of stylised outputs")
        if self.names and len(self.names) != len(self.styled):
            raise ValueError(f"names: {len(self.names)} labels for {len(self.styled)} styled folders")
        for name, low in (("style_max_side", 32), ("kid_subsets", 1), ("kid_subset_size", 2), ("grid_rows", 0)):
            value = getattr(self, name)
            if not math.isfinite(value) or not value >= low:
                raise ValueError(f"{name} must be >= {low}, got {value!r}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be 'cpu', 'cuda' (or 'cuda:N') or 'mps', got {self.device!r}")
