"""Run with ComfyUI's python, in COMFYUI_DIR: load the pack as ComfyUI does, then LoadStyleLoRA and StyleStrength
on a checkpoint.

    python tests/comfyui_check_style_node.py PACK_DIR CHECKPOINT LORA_DIR GOOD OTHER THIRD BAD...  ->  one JSON line
"""

import json
import resource
import sys

from comfyui_env import load_pack, start_comfy


def patched_unet_weights(model, keys: set[str]) -> dict:
    """The UNet weights named in `keys` as ComfyUI bakes them for sampling (patches applied), copied, then
    unpatched. Only the patched keys: ComfyUI changes no other weight, and three copies of the whole fp32 UNet
    (3.4 GB each) on top of the loaded model would need about 10 GB more than this check's measured 6.6 GB peak,
    more than a 24 GB machine shared with a ComfyUI server and other test processes can be relied on to have."""
    model.patch_model(device_to=None, force_patch_weights=True)
    try:
        prefix = "diffusion_model."
        return {k[len(prefix):]: v.detach().clone() for k, v in model.model.state_dict().items()
                if k in keys and k.startswith(prefix)}
    finally:
        model.unpatch_model()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(pack: str, ckpt: str, lora_dir: str, good: str, other: str, third: str, *bad: str) -> None:
    start_comfy()
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", lora_dir)
    module = load_pack(pack)
    node_cls = module.NODE_CLASS_MAPPINGS["LoadStyleLoRA"]
    strength_node = module.NODE_CLASS_MAPPINGS["StyleStrength"]()
    listed = node_cls.INPUT_TYPES()["required"]["style"][0]
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    node = node_cls()
    m1, _, info, _ = node.load(model, clip, good, 0.8)
    m2, _, info2, _ = node.load(model, clip, good, 1.0, style_2=other, weight_2=3.0)
    # Three styles, weights 1:3:4 at strength 0.8 -> per-style patch strengths 0.8 x (1/8, 3/8, 4/8).
    m3, _, _, _ = node.load(model, clip, good, 0.8, style_2=other, weight_2=3.0, style_3=third, weight_3=4.0)
    key = next(iter(m2.patches))
    # StyleStrength at 0 on the 3-style model: the weights ComfyUI bakes are the base model's, exactly.
    styled_keys = set(m3.patches)
    base = patched_unet_weights(model, styled_keys)
    zero = patched_unet_weights(strength_node.apply(m3, 0.0)[0], styled_keys)
    half = patched_unet_weights(strength_node.apply(m3, 0.5)[0], styled_keys)
    refused = {}
    for name in bad:
        try:
            node.load(model, clip, name, 1.0)
            refused[name] = None
        except ValueError as e:
            refused[name] = str(e)
    print(json.dumps({
        "registered": "stylora" in folder_paths.folder_names_and_paths, "listed": listed,
        "patched": len(m1.patches), "strength": m1.patches[next(iter(m1.patches))][0][0],
        "blend_patches_per_key": len(m2.patches[key]), "blend_strengths": [p[0] for p in m2.patches[key]],
        "blend3_keys": len(m3.patches),
        "blend3_strengths": sorted({tuple(round(p[0], 6) for p in plist) for plist in m3.patches.values()}),
        "strength0_max_diff": max_diff(zero, base), "strength05_max_diff": max_diff(half, base),
        "base_untouched": len(model.patches), "info": info2, "refused": refused, "compared": len(base),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
