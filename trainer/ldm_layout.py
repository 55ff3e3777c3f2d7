"""Key mapping from diffusers' SD1.x module names to the original LDM single-file layout.

The original CompVis checkpoint (`v1-5-pruned-emaonly.safetensors`) stores the UNet under
`model.diffusion_model.*`, the VAE under `first_stage_model.*` and the CLIP text model under
`cond_stage_model.transformer.*`. ComfyUI's `CheckpointLoaderSimple` and A1111 read that layout;
diffusers reads it back with `from_single_file`. diffusers ships only the opposite direction inside
the library, so the forward direction lives here (used for DreamBooth exports and test fixtures).
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# ResnetBlock2D sub-module names: diffusers -> LDM (the UNet's ResBlock and the VAE's ResnetBlock differ).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _unet_prefix_map(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for every UNet block, derived from the UNet config."""
    layers = int(config["layers_per_block"])
    n_blocks = len(config["block_out_channels"])
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n_blocks):
        for j in range(layers):
            ldm = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1."))
        if i < n_blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
    up_types = config["up_block_types"]
    for i in range(n_blocks):
        has_attention = "CrossAttn" in up_types[i]
        for j in range(layers + 1):
            ldm = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1."))
        if i < n_blocks - 1:
            slot = 2 if has_attention else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (layers + 1) + layers}.{slot}."))
    return pairs


def _rename_resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table[head]}.{tail}" if head in table else rest


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `UNet2DConditionModel` state dict to LDM keys (with `model.diffusion_model.`)."""
    pairs = sorted(_unet_prefix_map(config), key=lambda p: -len(p[0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for src, dst in pairs:
            if key.startswith(src):
                rest = key[len(src):]
                if ".resnets." in src:
                    rest = _rename_resnet(rest, _UNET_RESNET)
                out[UNET_PREFIX + dst + rest] = value
                break
        else:
            raise KeyError(f"UNet key {key!r} has no LDM equivalent; is this an SD1.x UNet?")
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor], n_blocks: int = 4) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to LDM keys (with `first_stage_model.`).

    LDM's VAE attention uses 1x1 convolutions, so linear weights [C, C] become [C, C, 1, 1].
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        parts = key.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            side, kind, i = parts[0], parts[1], int(parts[2])
            ldm_i = i if kind == "down_blocks" else n_blocks - 1 - i
            ldm_kind = "down" if kind == "down_blocks" else "up"
            if parts[3] == "resnets":
                rest = _rename_resnet(".".join(parts[5:]), _VAE_RESNET)
                new = f"{side}.{ldm_kind}.{ldm_i}.block.{parts[4]}.{rest}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sample = "downsample" if kind == "down_blocks" else "upsample"
                new = f"{side}.{ldm_kind}.{ldm_i}.{sample}.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            side = parts[0]
            if parts[2] == "resnets":
                rest = _rename_resnet(".".join(parts[4:]), _VAE_RESNET)
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                rest = ".".join(parts[4:])
                for src, dst in _VAE_ATTENTION.items():
                    if rest.startswith(src + "."):
                        rest = dst + rest[len(src):]
                        break
                new = f"{side}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        elif parts[1] == "conv_norm_out":
            new = f"{parts[0]}.norm_out.{'.'.join(parts[2:])}"
        out[VAE_PREFIX + new] = value
    return out


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix a transformers `CLIPTextModel` state dict for SD1.x (`cond_stage_model.transformer.text_model.`).

    transformers >= 5.6 flattened `CLIPTextModel` (no `text_model.` level); the LDM layout keeps it.
    """
    out = {}
    for k, v in state_dict.items():
        out[TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out


def pipeline_to_ldm(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One single-file SD1.x state dict from diffusers components, optionally cast to `dtype`."""
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    sd.update(text_encoder_to_ldm(text_encoder.state_dict()))
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out
