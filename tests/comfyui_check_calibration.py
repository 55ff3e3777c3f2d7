"""Run with ComfyUI's python, in COMFYUI_DIR: a calibrated style file through stock LoraLoader (every key mapped),
Load Style LoRA (style info says calibrated) and Style Strength (the calibrated mapping), and an uncalibrated copy.

    python tests/comfyui_check_calibration.py PACK_DIR CHECKPOINT LORA_DIR CALIBRATED UNCALIBRATED  ->  one JSON line
"""

import json
import logging
import sys

from comfyui_env import Collect, load_pack, start_comfy


def main(pack: str, ckpt: str, lora_dir: str, calibrated: str, uncalibrated: str) -> None:
    handler = Collect()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    start_comfy()
    import comfy.sd
    import folder_paths

    import nodes

    folder_paths.add_model_folder_path("loras", lora_dir)
    module = load_pack(pack)
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    # 1. Stock LoraLoader on the calibrated file: every key mapped.
    stock_model, _ = nodes.LoraLoader().load_lora(model, clip, calibrated, 1.0, 1.0)
    unmapped = [m for m in handler.messages if "lora key not loaded" in m or "NOT LOADED" in m]
    # 2. Load Style LoRA and Style Strength.
    loader = module.NODE_CLASS_MAPPINGS["LoadStyleLoRA"]()
    strength = module.NODE_CLASS_MAPPINGS["StyleStrength"]()
    styled, styled_clip, info, _ = loader.load(model, clip, calibrated, 1.0)
    _, denoise, _, guard, mapping = strength.apply(styled, 0.5, 0.75, styled_clip)
    plain, plain_clip, plain_info, _ = loader.load(model, clip, uncalibrated, 1.0)
    _, plain_denoise, _, _, plain_mapping = strength.apply(plain, 0.5, 0.75, plain_clip)
    print(json.dumps({
        "stock_patched": len(stock_model.patches), "unmapped": unmapped,
        "info_calibrated": info["calibrated"], "style_calibrated": info["styles"][0]["calibrated"],
        "denoise": denoise, "guard": guard, "mapping": mapping,
        "plain_info_calibrated": plain_info["calibrated"], "plain_denoise": plain_denoise,
        "plain_mapping": plain_mapping,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
