"""Run with ComfyUI's python, in COMFYUI_DIR: Style From Image's paper mode composed with the rest of a graph and
sampled by ComfyUI's own KSampler node: a batch of two photos, CFG 3, a latent noise mask set by Masked Style
Apply, a Load Style LoRA style on the model Style From Image gets, and the samplers euler, dpmpp_2m and ddim.

    python tests/comfyui_check_style_compose.py PACK_DIR CHECKPOINT LORA_DIR SPEC_JSON  ->  one JSON line

SPEC_JSON: {"photos": [2, H, W, 3], "painting": [1, H', W', 3], "mask": [H, W] (1: styled), "lora": the style's file
name in LORA_DIR, "steps", "denoise", "cfg", "samplers"}. Every sample is a KSampler latent (model-space / 0.18215,
as KSampler returns it); the numbers the test asserts on are computed here. The batch-1 runs, CFG 1 and the
unstyled run use the first sampler only (each full-size UNet row costs seconds on a CPU).
"""

import json
import sys

from comfyui_env import load_pack, start_comfy


def state(patcher) -> str:
    """What a node must not change on a ModelPatcher it is given."""
    patches = {k: [(p[0], id(p[1]), p[2]) for p in v] for k, v in patcher.patches.items()}
    return repr((patches, str(patcher.patches_uuid), patcher.model_options, getattr(patcher, "wrappers", None),
                 getattr(patcher, "callbacks", None), sorted(patcher.attachments)))


def main(pack: str, ckpt: str, lora_dir: str, spec_json: str) -> None:
    start_comfy()
    import comfy.sd
    import folder_paths
    import torch

    import nodes

    folder_paths.add_model_folder_path("loras", lora_dir)
    module = load_pack(pack)
    ours = module.NODE_CLASS_MAPPINGS
    spec = json.load(open(spec_json))
    photos, painting, mask = (torch.tensor(spec[k], dtype=torch.float32) for k in ("photos", "painting", "mask"))
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    report: dict = {}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        before_base = state(model)
        lora_model, lora_clip, _, _ = ours["LoadStyleLoRA"]().load(model, clip, spec["lora"], 1.0)
        before_lora = state(lora_model)
        (positive,) = nodes.CLIPTextEncode().encode(lora_clip, "a photo")
        (negative,) = nodes.CLIPTextEncode().encode(lora_clip, "")
        (latent,) = nodes.VAEEncode().encode(vae, photos)
        content, masked, _ = ours["MaskedStyleApply"]().apply(photos, mask[None], 0, False, latent=latent)

        def styled_model(samples):
            (styled,) = ours["StyleFromImage"]().apply(lora_model, painting, vae, {"samples": samples}, mode="paper")
            return styled

        def ksample(styled, samples, cfg, sampler):
            lat = {"samples": samples, "noise_mask": masked["noise_mask"]}
            return nodes.KSampler().sample(styled, 7, spec["steps"], cfg, sampler, "normal", positive, negative, lat,
                                           denoise=spec["denoise"])[0]["samples"].float()

        x0 = latent["samples"].float()
        keep = torch.nn.functional.interpolate(mask[None, None], size=x0.shape[-2:], mode="bilinear")[0, 0] == 0
        runs = {}
        for sampler in spec["samplers"]:
            both = ksample(styled_model(latent["samples"]), latent["samples"], spec["cfg"], sampler)
            runs[sampler] = both
            report[sampler] = {
                "finite": bool(torch.isfinite(both).all()),
                "std_per_item": [float(both[i].std()) for i in range(2)],
                "items_differ": float((both[0] - both[1]).abs().mean()),
                # the masked-out latents against the photo's: max |diff| / max |photo latent|
                "kept_vs_photo": float((both - x0)[..., keep].abs().max() / x0.abs().max()),
                "styled_vs_photo": float((both - x0)[..., ~keep].abs().mean()),
            }
        first = spec["samplers"][0]
        # Batch item i against photo i sampled alone (batch 1), first sampler: max |diff| / max |alone|.
        alone = torch.cat([ksample(styled_model(latent["samples"][i:i + 1]), latent["samples"][i:i + 1],
                                   spec["cfg"], first) for i in range(2)])
        report["batch_vs_alone"] = float((runs[first] - alone).abs().max() / alone.abs().max())
        report["cfg1_vs_cfg"] = float((ksample(styled_model(latent["samples"]), latent["samples"], 1.0, first)
                                       - runs[first]).abs().mean())
        plain = ksample(lora_model, latent["samples"], spec["cfg"], first)
        report["styled_vs_plain"] = float((runs[first] - plain)[..., ~keep].abs().mean())
        # Decoded and composited by Masked Style Apply: outside the mask the photo's pixels, exactly.
        (decoded,) = nodes.VAEDecode().decode(vae, {"samples": runs[first]})
        image, _, _ = ours["MaskedStyleApply"]().apply(photos, mask[None], 0, False, styled=decoded)
        outside = mask == 0
        report["pixels_outside_equal"] = bool(torch.equal(image[:, outside], photos[:, outside]))
        report["pixels_inside_changed"] = float((image[:, ~outside] - photos[:, ~outside]).abs().mean())
        report["image_finite"] = bool(torch.isfinite(image).all())
        report["base_untouched"] = state(model) == before_base
        report["lora_model_untouched"] = state(lora_model) == before_lora
        report["lora_patches"] = len(lora_model.patches)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
