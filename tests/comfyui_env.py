"""Shared start of the scripts that run under ComfyUI's python (tests/comfyui_check_*.py)."""

import importlib.util
import os
import sys


def start_comfy() -> None:
    """Parse ComfyUI's arguments as its main.py would: comfy.cli_args reads sys.argv at import; a CPU-only host
    needs --cpu, a GPU host can set COMFYUI_ARGS=""."""
    sys.argv = [sys.argv[0], *os.environ.get("COMFYUI_ARGS", "--cpu").split()]
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
