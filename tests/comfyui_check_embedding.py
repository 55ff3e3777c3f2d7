"""Run with ComfyUI's python, in COMFYUI_DIR: load an SD1.5 checkpoint with an embeddings folder as the stock
CheckpointLoaderSimple does, encode prompts with `embedding:<name>` as CLIPTextEncode does, and report what changed
and what ComfyUI logged.

    python tests/comfyui_check_embedding.py CHECKPOINT EMBEDDINGS_DIR NAME   ->  prints one JSON line
"""

import json
import logging
import sys

from comfyui_env import Collect, start_comfy


def main(ckpt: str, embeddings: str, name: str) -> None:
    handler = Collect()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    start_comfy()
    import comfy.sd
    import safetensors.torch
    import torch

    _model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True,
                                                                  embedding_directory=embeddings)

    def condition(text: str) -> torch.Tensor:
        return clip.encode_from_tokens(clip.tokenize(text))

    prompt = f"a painting in the style of embedding:{name}"
    tokens = clip.tokenize(prompt)
    injected = [t[0] for t in tokens["l"][0] if isinstance(t[0], torch.Tensor)]
    stored = safetensors.torch.load_file(f"{embeddings}/{name}.safetensors")["emb_params"]
    before = len(handler.messages)
    with_embedding = condition(prompt)
    warnings_with = [m for m in handler.messages[before:] if "does not exist" in m or "error loading embedding" in m]
    without = condition("a painting in the style of")
    before = len(handler.messages)
    condition("a painting in the style of embedding:no_such_embedding")  # the detector sees a real miss
    warnings_missing = [m for m in handler.messages[before:] if "does not exist" in m]
    print(json.dumps({
        "injected": len(injected),
        "injected_equal_file": bool(len(injected) == len(stored)
                                    and all(torch.equal(a.float(), b.float()) for a, b in zip(injected, stored))),
        "shape": list(with_embedding.shape),
        "max_diff": float((with_embedding - without).abs().max()),
        "warnings_with": warnings_with,
        "warnings_missing": warnings_missing,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
