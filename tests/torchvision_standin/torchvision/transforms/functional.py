"""torchvision.transforms.functional: the InterpolationMode enum importers name; every function fails."""

import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    def missing(*args, **kwargs):
        raise ImportError(f"torchvision is not installed (torchvision.transforms.functional.{name})")
    return missing
