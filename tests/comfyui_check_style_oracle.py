"""Run with ComfyUI's python, in COMFYUI_DIR: Style From Image's paper mode sampled by ComfyUI itself (its sampler
wrapper, calc_cond_batch, euler, the attention patches in ComfyUI's UNet) on the tiny SD1.5-shaped weights.

    python tests/comfyui_check_style_oracle.py PACK_DIR TINY_CHECKPOINT SPEC_JSON  ->  one JSON line

SPEC_JSON: {"photo", "painting": [1, 4, h, w] model-space latents, "context": [1, T, C] prompt embedding,
"timesteps": sampled timesteps}. The tiny checkpoint is not one ComfyUI's detection knows (its widths are not
SD1.5's), so its UNet is built with SD1.5's model config over the detected UNet shape. Prints {"latent": the
stylised model-space latent, "sigmas": the sigmas sampled}.
"""

import json
import sys

from comfyui_env import load_pack, start_comfy


class _LatentVAE:
    """Encodes to the given latent (divided by SD1.5's 0.18215, which the node multiplies back)."""

    def __init__(self, latent):
        self.latent = latent

    def encode(self, pixels):
        return self.latent / 0.18215


def main(pack: str, ckpt: str, spec_json: str) -> None:
    start_comfy()
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    import comfy.utils
    import torch

    torch.set_num_threads(1)  # a 16x16 latent gains nothing from threads, and loses much on a shared CPU
    module = load_pack(pack)
    spec = json.load(open(spec_json))
    photo, painting, context = (torch.tensor(spec[k]) for k in ("photo", "painting", "context"))
    sd = comfy.utils.load_torch_file(ckpt)
    prefix = "model.diffusion_model."
    config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(sd, prefix))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, prefix)
    model.load_model_weights(sd, prefix)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    sampling = model.model_sampling
    sigmas = torch.tensor([float(sampling.sigmas[t]) for t in spec["timesteps"]] + [0.0])
    cond = [[context, {}]]
    with torch.inference_mode():
        (styled,) = module.NODE_CLASS_MAPPINGS["StyleFromImage"]().apply(
            patcher, torch.rand(1, photo.shape[-2] * 8, photo.shape[-1] * 8, 3), _LatentVAE(painting),
            {"samples": photo / 0.18215}, mode="paper")
        out = comfy.sample.sample_custom(styled, torch.zeros_like(photo), 1.0, comfy.samplers.sampler_object("euler"),
                                         sigmas, cond, cond, photo / 0.18215, seed=0)
    print(json.dumps({"latent": (out * 0.18215).tolist(), "sigmas": sigmas.tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
