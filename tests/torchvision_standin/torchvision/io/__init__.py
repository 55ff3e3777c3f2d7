"""torchvision.io names transformers' image utilities import; calling them fails."""


class ImageReadMode:
    UNCHANGED = RGB = GRAY = None


def __getattr__(name):
    def missing(*args, **kwargs):
        raise ImportError(f"torchvision is not installed (torchvision.io.{name})")
    return missing
