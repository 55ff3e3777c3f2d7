"""The one stand-in for ComfyUI in the default suite, and the real ComfyUI objects the same tests run against.

FakeComfy installs stand-ins of the modules `nodes.host` reaches (`comfy.sd`, `comfy.lora`, `comfy.supported_models`,
`comfy.model_management`, `comfy.utils`, `folder_paths`) into `sys.modules`, so the pack's own host functions run
(their feature checks included) on these objects:

- FakePatcher: ComfyUI's ModelPatcher as the nodes use it: `model`, `patches` (per weight key, a list of
  (strength_patch, adapter, strength_model, offset, function) tuples), `patches_uuid`, `model_options` (deep-copied
  by clone, as ComfyUI's), attachments (shared by reference across clones), `add_patches`, the attention-patch
  setters. FakeCLIP: a CLIP whose `patcher` is one; FakeVAE: 8x average-pooling encoder that can overflow.
- `load_lora_for_models` adds one patch per file at the given strength (its adapter records the file's keys),
  `model_lora_keys_*` map `lora_unet_x` to one weight key, SD15 is the model config class.

Hosts (`host` fixture, conftest.py): FakeHost builds patchers on FakePatcher; RealHost on ComfyUI's own
ModelPatcher (COMFYUI_DIR, imported into this process with ComfyUI's modules taken out again afterwards).
Both offer `patcher(keys)`, `add_patch(patcher, key, adapter, strength_patch, strength_model)` and `clip(patcher)`,
so a behaviour test written once checks the pack against both.
"""

from __future__ import annotations

import copy
import os
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

STYLE_KEY = "diffusion_model.x.weight"  # the one weight the fake SD1.5 model has
STYLE_SHAPE = (8, 8)


class FakeModel:
    """ComfyUI's BaseModel as the nodes see it: a model config (SD15 by default), weights, the latent scaling."""

    def __init__(self, config: Any = None, weights: dict[str, torch.Tensor] | None = None):
        self.model_config = config
        self.weights = dict(weights or {})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def process_latent_in(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.18215  # SD1.5's latent scale


class FakePatcher:
    """The parts of ComfyUI's ModelPatcher the nodes use (see the module docstring)."""

    def __init__(self, model: Any = None, patches: dict | None = None, attachments: dict | None = None):
        self.model = model if model is not None else FakeModel()
        self.patches = {k: list(v) for k, v in (patches or {}).items()}
        self.attachments = dict(attachments or {})
        self.patches_uuid = "base"
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.wrappers: dict[str, dict[str, list]] = {}

    def clone(self) -> FakePatcher:
        n = type(self)(self.model, {k: v[:] for k, v in self.patches.items()}, self.attachments)
        n.patches_uuid = self.patches_uuid
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: w[:] for k, w in ws.items()} for t, ws in self.wrappers.items()}
        return n

    def add_wrapper_with_key(self, wrapper_type: str, key: str, wrapper: Any) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type: str, key: str) -> None:
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        for key, adapter in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, adapter, strength_model, None, None))
        self.patches_uuid = uuid.uuid4()  # as ComfyUI's: the weights change, so their bake must not be reused
        return list(patches)

    def get_attachment(self, key: str) -> Any:
        return self.attachments.get(key)

    def set_attachments(self, key: str, value: Any) -> None:
        self.attachments[key] = value

    def remove_attachments(self, key: str) -> None:
        self.attachments.pop(key, None)

    def set_model_unet_function_wrapper(self, f: Any) -> None:
        self.model_options["model_function_wrapper"] = f

    def set_model_attn1_replace(self, patch: Any, block_name: str, number: int, transformer_index: int | None = None):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn1"] = {**to["patches_replace"].get("attn1", {}),
                                          (block_name, number, transformer_index): patch}
        self.model_options["transformer_options"] = to


class FakeCLIP:
    """ComfyUI's CLIP as the nodes see it: a ModelPatcher in `.patcher`, cloned by `clone()`, and the text model."""

    def __init__(self, patcher: Any = None, weights: dict[str, torch.Tensor] | None = None):
        self.patcher = patcher if patcher is not None else FakePatcher()
        self.cond_stage_model = FakeModel(weights=weights)

    def clone(self) -> FakeCLIP:
        n = type(self)(self.patcher.clone())
        n.cond_stage_model = self.cond_stage_model
        return n


class FakeVAE:
    """ComfyUI VAE stand-in: [B, H, W, 3] -> [B, 4, H/8, W/8] by 8x average pooling. `bad` = "all" makes every
    value NaN (an fp16 VAE that overflowed everywhere), "one" a single value; `calls` records encode/encode_tiled."""

    def __init__(self, bad: str | bool = False):
        self.bad = "all" if bad is True else bad
        self.calls: list[str] = []

    def _enc(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        x = torch.cat([x, x[:, :1]], 1)
        if self.bad == "all":
            return x * float("nan")
        if self.bad == "one":
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
        return x

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append("encode")
        return self._enc(pixels)

    def encode_tiled(self, pixels: torch.Tensor, tile_x: int, tile_y: int, overlap: int) -> torch.Tensor:
        self.calls.append(f"tiled {tile_x}")
        return self._enc(pixels)

    def get_sd(self) -> dict[str, torch.Tensor]:
        return {"bad": torch.tensor(self.bad == "all")}


class SD15:
    """comfy.supported_models.SD15 stand-in."""


class FakeComfy:
    """Stand-ins of ComfyUI's modules, installed into sys.modules by `install(monkeypatch)`.

    `styles`: style name -> file (folder_paths lookups); `loaded`: (sorted file keys, strength_model,
    strength_clip) per load_lora_for_models call; `vaes`: (state dict, dtype) of each comfy.sd.VAE built."""

    def __init__(self, styles: dict[str, str] | None = None, models_dir: str = "/comfy/models"):
        self.styles = dict(styles or {})
        self.loaded: list[tuple[list[str], float, float]] = []
        self.vaes: list[tuple[dict, torch.dtype]] = []
        fake = self

        def load_lora_for_models(model, clip, state, strength_model, strength_clip):
            fake.loaded.append((sorted(state), strength_model, strength_clip))
            patched = model.clone()
            patched.add_patches({STYLE_KEY: ("lora", tuple(sorted(state)))}, strength_model)
            return patched, clip

        def vae(sd=None, dtype=None):
            fake.vaes.append((sd, dtype))
            return FakeVAE()

        self.sd = types.SimpleNamespace(load_lora_for_models=load_lora_for_models, VAE=vae)
        self.lora = types.SimpleNamespace(
            model_lora_keys_unet=lambda model, key_map: {**key_map, "lora_unet_x": STYLE_KEY},
            model_lora_keys_clip=lambda clip_model, key_map: key_map)
        self.supported_models = types.SimpleNamespace(SD15=SD15)
        self.folder_paths = types.SimpleNamespace(
            models_dir=models_dir, folder_names_and_paths={}, supported_pt_extensions={".safetensors"},
            get_filename_list=lambda key: sorted(fake.styles) if key in ("stylora", "loras") else [],
            get_full_path=lambda key, name: fake.styles.get(name) if key == "stylora" else None,
            get_folder_paths=lambda key: fake.folder_paths.folder_names_and_paths[key][0])
        self.folder_paths.folder_names_and_paths["stylora"] = ([f"{models_dir}/styles"], {".safetensors"})

    def model(self, config: Any = None) -> FakePatcher:
        """An SD1.5 model (`config`: another model config) with the one weight STYLE_KEY."""
        return FakePatcher(FakeModel(SD15() if config is None else config, {STYLE_KEY: torch.zeros(STYLE_SHAPE)}))

    def install(self, monkeypatch) -> FakeComfy:
        comfy = types.ModuleType("comfy")
        comfy.sd, comfy.lora, comfy.supported_models = self.sd, self.lora, self.supported_models
        for name, module in (("comfy", comfy), ("comfy.sd", self.sd), ("comfy.lora", self.lora),
                             ("comfy.supported_models", self.supported_models), ("folder_paths", self.folder_paths)):
            monkeypatch.setitem(sys.modules, name, module)
        return self


# --- Hosts: the same patcher operations on the fake and on ComfyUI's ModelPatcher ----------------------------

class FakeHost:
    name = "fake"

    def patcher(self, keys: tuple[str, ...] = ()) -> FakePatcher:
        return FakePatcher(FakeModel(weights={k: torch.zeros(2, 2) for k in keys}))

    def add_patch(self, patcher: Any, key: str, adapter: Any, strength_patch: float, strength_model: float = 1.0):
        patcher.add_patches({key: adapter}, strength_patch, strength_model)

    def clip(self, patcher: Any) -> FakeCLIP:
        return FakeCLIP(patcher)


class RealHost(FakeHost):
    """ComfyUI's own ModelPatcher around a small torch module whose parameters are named by the weight keys."""

    name = "real"

    def __init__(self, model_patcher: Any):
        self.ModelPatcher = model_patcher

    def patcher(self, keys: tuple[str, ...] = ()) -> Any:
        root = torch.nn.Module()
        for key in keys:
            *path, leaf = key.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False))
        return self.ModelPatcher(root, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def import_real_comfyui() -> Any:
    """ComfyUI's ModelPatcher class, imported from COMFYUI_DIR into this process on the CPU; the caller takes
    ComfyUI's modules out of sys.modules afterwards (see conftest's `host`)."""
    from comfyui_env import comfyui_pythonpath

    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path[:0] = [p for p in comfyui_pythonpath(comfy_dir).split(os.pathsep) if p]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: no CUDA is looked for
    import comfy.model_patcher

    assert Path(comfy.model_patcher.__file__).is_relative_to(comfy_dir), comfy.model_patcher.__file__
    return comfy.model_patcher.ModelPatcher
