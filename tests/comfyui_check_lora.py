"""Run with ComfyUI's python, in COMFYUI_DIR: load an SD1.5 checkpoint and a LoRA exactly as the stock
LoraLoader node does (comfy.sd.load_lora_for_models) and report what ComfyUI mapped and what it did not.

    python tests/comfyui_check_lora.py CHECKPOINT LORA   ->  prints one JSON line
"""

import json
import logging
import sys

from comfyui_env import Collect, start_comfy


def main(ckpt: str, lora: str) -> None:
    handler = Collect()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    start_comfy()
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    lora_sd = comfy.utils.load_torch_file(lora, safe_load=True)
    model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
    unmapped = [m for m in handler.messages if "lora key not loaded" in m or "NOT LOADED" in m]
    print(json.dumps({
        "is_sd15": isinstance(model.model.model_config, comfy.supported_models.SD15),
        "lora_tensors": len(lora_sd),
        "patched_unet_weights": len(model_lora.patches),
        "patched_clip_weights": len(clip_lora.patcher.patches),
        "unmapped": unmapped,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
