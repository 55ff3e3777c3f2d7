"""Run with ComfyUI's python, in COMFYUI_DIR: load the pack as ComfyUI does, then LoadStyleLoRA on a checkpoint.

    python tests/comfyui_check_style_node.py PACK_DIR CHECKPOINT LORA_DIR GOOD OTHER BAD...  ->  one JSON line
"""

import json
import sys

from comfyui_env import load_pack, start_comfy


def main(pack: str, ckpt: str, lora_dir: str, good: str, other: str, *bad: str) -> None:
    start_comfy()
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", lora_dir)
    module = load_pack(pack)
    node_cls = module.NODE_CLASS_MAPPINGS["LoadStyleLoRA"]
    listed = node_cls.INPUT_TYPES()["required"]["style"][0]
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    node = node_cls()
    m1, _, info, _ = node.load(model, clip, good, 0.8)
    m2, _, info2, _ = node.load(model, clip, good, 1.0, style_2=other, weight_2=3.0)
    key = next(iter(m2.patches))
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
        "base_untouched": len(model.patches), "info": info2, "refused": refused,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
