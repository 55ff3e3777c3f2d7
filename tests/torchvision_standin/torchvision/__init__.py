"""Import-only torchvision stand-in (see ../README.md): names exist, using them raises ImportError."""

__version__ = "0.24.0"  # transformers and diffusers read a version at import time


class _Missing:
    def __getattr__(self, name):
        raise ImportError(f"torchvision is not installed on this machine (torchvision.{name})")


models = _Missing()
ops = _Missing()

from . import io, transforms  # noqa: E402,F401
