"""`AdaINConfig`, the settings of `stylora adain`: kept free of torch so that the command line builds its parser
without loading torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AdaINConfig:
    content: str = field(metadata={"help": "the content photo"})
    style: str = field(metadata={"help": "the style image (a painting)"})
    out: str = field(metadata={"help": "the output image (.png, .jpg or .webp)"})
    alpha: float = field(default=1.0, metadata={
        "help": "content-style trade-off in 0..1 (paper, eq. 14): 1 is the full AdaIN output, 0 decodes the photo's "
                "own features"})
    max_side: int = field(default=512, metadata={
        "help": "the photo and the style image are shrunk to this longest side (never enlarged); 512 is the size "
                "the published decoder was trained at"})
    device: str | None = field(default=None, metadata={"help": "\"cuda\", \"cpu\"; None picks CUDA when available"})

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be in 0..1, got {self.alpha!r}")
        if not self.max_side >= 64:
            raise ValueError(f"max_side must be >= 64, got {self.max_side!r}")
        if Path(self.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise ValueError(f"out: {self.out!r} must end in .png, .jpg, .jpeg or .webp")
