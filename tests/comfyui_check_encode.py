"""Run with ComfyUI's python, in COMFYUI_DIR: ContentEncode with ComfyUI's own VAE (plain, tiled, float32 copy).

    python tests/comfyui_check_encode.py PACK_DIR CHECKPOINT  ->  one JSON line
"""

import json
import sys

from comfyui_env import load_pack, start_comfy


def main(pack: str, ckpt: str) -> None:
    start_comfy()
    import comfy.sd
    import torch

    module = load_pack(pack)
    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=False, output_model=False)
    node = module.NODE_CLASS_MAPPINGS["ContentEncode"]()
    photo = torch.rand(1, 300, 200, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        latent, image, info, _ = node.encode(photo, vae, 512, 8, "stretch", "shrink only")
        tiled, _, tiled_info, _ = node.encode(photo, vae, 512, 8, "stretch", "shrink only", tiling="always",
                                           tile_size=256)
        half = comfy.sd.VAE(sd=vae.get_sd(), dtype=torch.float16)
        fp32 = node._fp32_vae(half)  # what a NaN from an fp16 VAE falls back to
        again = fp32.encode(image)
    print(json.dumps({"latent": list(latent["samples"].shape), "image": list(image.shape), "info": info,
                      "tiled": list(tiled["samples"].shape), "tiled_info": tiled_info,
                      "tiled_vs_plain": float((tiled["samples"] - latent["samples"]).abs().mean()),
                      "fp32_dtype": str(fp32.vae_dtype),
                      "fp32_vs_plain": float((again - latent["samples"]).abs().max())}))


if __name__ == "__main__":
    main(*sys.argv[1:])
