"""Shared start of the scripts that run under ComfyUI's python (tests/comfyui_check_*.py)."""

import importlib.util
import logging
import os
import sys


class Collect(logging.Handler):
    """Keeps every log message ComfyUI emits while attached (what the checks report as warnings)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def start_comfy() -> None:
    """Parse ComfyUI's arguments as its main.py would: comfy.cli_args reads sys.argv at import; a CPU-only host
    needs --cpu, a GPU host can set COMFYUI_ARGS="". COMFYUI_BASE_DIRECTORY (set by the tests to a fresh folder)
    becomes --base-directory: models/, input/, user/ of the shared ComfyUI checkout are never read or written, so
    a file another run left in its models/styles cannot stand in for the one a check loads by name."""
    base = os.environ.get("COMFYUI_BASE_DIRECTORY")
    sys.argv = [sys.argv[0], *os.environ.get("COMFYUI_ARGS", "--cpu").split(),
                *(("--base-directory", base) if base else ())]
    import comfy.options

    comfy.options.enable_args_parsing()


def load_pack(pack: str):
    """The pack's top-level module, loaded from its folder the way ComfyUI loads a custom node."""
    spec = importlib.util.spec_from_file_location("stylora_pack", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules["stylora_pack"] = module
    spec.loader.exec_module(module)
    return module


STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_standin")


def comfyui_pythonpath(*extra: str) -> str:
    """PYTHONPATH for a ComfyUI process: COMFYUI_PYTHONPATH (on CPU machines a torchvision stand-in), preceded by
    tests/torchvision_standin where that holds a stand-in (ours also covers what the trainer's diffusers imports
    need; a real torchvision is never shadowed), then `extra`."""
    given = [p for p in os.environ.get("COMFYUI_PYTHONPATH", "").split(os.pathsep) if p]
    standin = [STANDIN] if any(os.path.isdir(os.path.join(p, "torchvision")) for p in given) else []
    return os.pathsep.join([*standin, *given, *(p for p in extra if p)])
