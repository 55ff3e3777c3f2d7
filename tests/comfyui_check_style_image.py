"""Run with ComfyUI's python, in COMFYUI_DIR: the Style From Image graph (API format, from
tests/test_comfyui_style_image.py) executed node by node with ComfyUI's own node classes and ours.

    python tests/comfyui_check_style_image.py PACK_DIR CHECKPOINT GRAPHS_JSON  ->  one JSON line

GRAPHS_JSON: {"graphs": {name: api_graph}, "images": {file name: [[[r, g, b], ...]]}}. Load Image nodes are
answered from "images" (no upload folder needed); the checkpoint loader runs once and its MODEL is shared by all
graphs, so the check can see that our nodes leave it untouched.
"""

import json
import sys

from comfyui_env import load_pack, start_comfy


def main(pack: str, ckpt: str, graphs_json: str) -> None:
    start_comfy()
    import comfy.sd
    import torch

    import nodes

    module = load_pack(pack)
    spec = json.load(open(graphs_json))
    images = {k: torch.tensor(v, dtype=torch.float32) for k, v in spec["images"].items()}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    before = {"patches": len(model.patches), "options": repr(model.model_options),
              "attachments": sorted(model.attachments)}
    classes = {**nodes.NODE_CLASS_MAPPINGS, **module.NODE_CLASS_MAPPINGS}

    def execute(graph: dict) -> dict:
        done: dict[str, tuple] = {}

        def value(node_id: str) -> tuple:
            if node_id in done:
                return done[node_id]
            node = graph[node_id]
            kind, inputs = node["class_type"], dict(node["inputs"])
            for k, v in inputs.items():
                if isinstance(v, list):
                    inputs[k] = value(v[0])[v[1]]
            if kind == "CheckpointLoaderSimple":
                out = (model, clip, vae)
            elif kind == "LoadImage":
                out = (images[inputs["image"]], None)
            elif kind == "SaveImage":
                out = (inputs["images"],)
            else:
                cls = classes[kind]
                out = getattr(cls(), cls.FUNCTION)(**inputs)
                out = out["result"] if isinstance(out, dict) else out
            done[node_id] = out
            return out

        return {nid: value(nid) for nid in graph}

    results = {}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        for name, graph in spec["graphs"].items():
            out = execute(graph)
            saved = next(out[nid][0] for nid, n in graph.items() if n["class_type"] == "SaveImage")
            results[name] = (saved.clamp(0, 1) * 255).round().to(torch.uint8)  # what SaveImage writes
    after = {"patches": len(model.patches), "options": repr(model.model_options),
             "attachments": sorted(model.attachments)}

    def same(a: str, b: str) -> bool:
        return bool(torch.equal(results[a], results[b]))

    def diff(a: str, b: str) -> float:
        return float((results[a].float() - results[b].float()).abs().mean())

    print(json.dumps({
        "shapes": {k: list(v.shape) for k, v in results.items()},
        "finite": all(bool(torch.isfinite(v.float()).all()) for v in results.values()),
        "input_model_untouched": before == after, "before": before,
        "s0_equals_plain_d0": same("styled_s0", "plain_d0"),
        "s0_equals_plain_d05": same("styled_s0_d05", "plain_d05"),
        "injected_vs_plain_d05": diff("styled_s05_d05", "plain_d05"),
        "two_paintings": diff("styled", "styled_other"),
        "fast_s0_equals_plain_d0": same("styled_fast_s0", "plain_d0"),
        "paper_vs_fast": diff("styled", "styled_fast"),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
