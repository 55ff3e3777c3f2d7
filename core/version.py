"""The pack's version: in core so that every layer (LoRA metadata, the CLI) can read it without importing the
ComfyUI entry in `stylora/__init__.py`."""

__version__ = "0.1.0"
