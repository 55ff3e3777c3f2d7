"""The metric names and `EvalConfig`, the settings of `stylora eval`: kept free of torch so that the command line
builds its parser without loading the feature networks' libraries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PAIR_METRICS = ("ssim", "lpips", "lpips_vgg", "content", "lpips_style", "gram")  # one value per styled image
SET_METRICS = ("fid", "kid", "artfid")  # one value per styled folder
ALL_METRICS = PAIR_METRICS + SET_METRICS
# Which way is better, for the tables.
HIGHER_IS_BETTER = {"ssim": True, "lpips": False, "lpips_vgg": False, "content": False, "lpips_style": False,
                    "gram": False, "fid": False, "kid": False, "artfid": False}
DESCRIPTION = {
    "ssim": "SSIM to the content photo (structure kept)",
    "lpips": "LPIPS (AlexNet) to the content photo",
    "lpips_vgg": "LPIPS (VGG-16) to the content photo",
    "content": "VGG-19 relu4_2 content loss to the content photo",
    "lpips_style": "LPIPS (AlexNet) to the style images, mean over the style set",
    "gram": "Gram style loss to the style set's mean Gram matrices (VGG-19)",
    "fid": "FID of the outputs against the style set",
    "kid": "KID of the outputs against the style set",
    "artfid": "ArtFID = (1 + LPIPS) * (1 + FID)",
}


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
    kid_subsets: int = field(default=100, metadata={"help": "KID: number of random subsets"})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID: subset size (capped by the set sizes)"})
    grid_rows: int = field(default=6, metadata={"help": "rows of the content | style | output grid"})
    device: str | None = field(default=None, metadata={"help": "\"cuda\", \"cpu\"; None picks CUDA when available"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "style-set Inception feature cache; None: ~/.cache/stylora/features"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; choose from {list(ALL_METRICS)}")
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
