"""torchvision.transforms names that spandrel and transformers import; using any other name fails."""

from .functional import InterpolationMode  # noqa: F401


def __getattr__(name):
    raise ImportError(f"torchvision is not installed (torchvision.transforms.{name})")
