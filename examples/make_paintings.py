"""Writes examples/paintings/: eight 256x256 'paintings' in one flat poster style, a sample folder to train a first
style on (`stylora train lora --data examples/paintings ...`). Made from scikit-image's public-domain and CC0
sample images (NASA photos, and Stefan van der Walt's and Rachel Michetti's CC0 photos), each coarsened by a mode
filter, posterised to 3 bits per channel and saturated, so that every picture shares one look for a LoRA to learn.

    python examples/make_paintings.py      # needs scikit-image (the test extras)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "brick", "grass", "gravel")
SIDE = 256  # the trainer's default 512 px needs a shorter side of at least 256
QUALITY = 70  # JPEG quality: a few KB to 25 KB a picture


def make_paintings(out: Path) -> list[Path]:
    from skimage import data

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in NAMES:
        arr = getattr(data, name)()
        arr = np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr[..., :3]
        img = ImageOps.fit(Image.fromarray(arr.astype(np.uint8)), (SIDE, SIDE), Image.Resampling.LANCZOS)
        img = ImageOps.posterize(img.filter(ImageFilter.ModeFilter(7)), 3)
        img = ImageEnhance.Color(img).enhance(1.6)
        path = out / f"{name}.jpg"
        img.save(path, quality=QUALITY)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in make_paintings(Path(__file__).resolve().parent / "paintings"):
        print(p, p.stat().st_size, "bytes")
