"""Writes the bundled workflows, each in both formats, from one description per workflow below.

    python workflows/build.py [OBJECT_INFO_JSON]

UI format (drag onto the canvas, listed in ComfyUI's Templates browser) -> examples/<name>.json
API format (POST to /prompt, used by `stylora run`)                     -> workflows/api/<name>.json
The trimmed core-node schema the offline test falls back on             -> tests/fixtures/core_nodes-0.3.64.json

Widget order, link types and output slots come from the node schema: ComfyUI's /object_info for the core
nodes (default: ../shared/comfyui/object_info-0.3.64.json) and our own node declarations, so the two formats
cannot drift apart. Roles that `stylora run` substitutes are found by node title (`_meta.title`); the titles
come from workflows/roles.py, the one list both sides read. Runnable as a script and importable as
`stylora.workflows.build`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__:  # imported as stylora.workflows.build
    from ..nodes import NODE_CLASS_MAPPINGS
    from . import roles
else:  # run as `python workflows/build.py`: the installed pack (`pip install -e .`)
    from stylora.nodes import NODE_CLASS_MAPPINGS
    from stylora.workflows import roles

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OBJECT_INFO = REPO.parent / "shared" / "comfyui" / "object_info-0.3.64.json"
CORE_SUBSET = REPO / "tests" / "fixtures" / "core_nodes-0.3.64.json"
LINK_FREE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}  # widget types; a list (combo) is a widget too
UI_ONLY_TYPES = {"Note", "MarkdownNote"}  # frontend nodes: no schema, not in API format
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the SD1.5 file most ComfyUI users have


def our_schema() -> dict[str, dict]:
    """Our nodes as /object_info would list them (style lists are empty without a server)."""
    out = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        out[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                     "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES),
                     "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return out


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in LINK_FREE_TYPES


def widget_names(entry: dict) -> list[str]:
    """Names of a node's widget inputs in the order of its widgets_values (required, then optional)."""
    names = []
    for group in ("required", "optional"):
        for name in entry.get("input_order", {}).get(group, entry["input"].get(group, {})):
            if is_widget(entry["input"][group][name]):
                names.append(name)
    return names


def input_spec(entry: dict, name: str) -> list | None:
    for group in ("required", "optional"):
        if name in entry["input"].get(group, {}):
            return entry["input"][group][name]
    return None


@dataclass
class Node:
    id: int
    type: str
    title: str
    pos: tuple[int, int]
    values: dict[str, Any] = field(default_factory=dict)  # widget values (defaults from the schema otherwise)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source node id, output slot)
    size: tuple[int, int] = (320, 130)


def note(id_: int, pos: tuple[int, int], text: str, size: tuple[int, int] = (420, 300)) -> Node:
    return Node(id_, "Note", "How to use", pos, {"text": text}, size=size)


def _default(spec: list) -> Any:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def to_api(nodes: list[Node], schema: dict[str, dict]) -> dict[str, dict]:
    api = {}
    for n in nodes:
        if n.type in UI_ONLY_TYPES:
            continue
        entry = schema[n.type]
        inputs: dict[str, Any] = {}
        for name in widget_names(entry):
            if name not in n.links:
                inputs[name] = n.values.get(name, _default(input_spec(entry, name)))
        for name, (src, slot) in n.links.items():
            inputs[name] = [str(src), slot]
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title}}
    return api


def to_ui(nodes: list[Node], schema: dict[str, dict], extra_note: str = "") -> dict[str, Any]:
    by_id = {n.id: n for n in nodes}
    links = []
    for n in nodes:
        for name, (src, slot) in n.links.items():
            links.append([len(links) + 1, src, slot, n.id, name, schema[by_id[src].type]["output"][slot]])
    ui_nodes = []
    for order, n in enumerate(nodes):
        if n.type in UI_ONLY_TYPES:
            ui_nodes.append({"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                             "order": order, "mode": 0, "inputs": [], "outputs": [], "title": n.title,
                             "properties": {}, "widgets_values": [n.values["text"]]})
            continue
        entry = schema[n.type]
        inputs = []
        for group in ("required", "optional"):
            for name in entry.get("input_order", {}).get(group, entry["input"].get(group, {})):
                spec = entry["input"][group][name]
                link = next((lk for lk in links if lk[3] == n.id and lk[4] == name), None)
                if is_widget(spec) and link is None:
                    continue
                item = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0],
                        "link": link[0] if link else None}
                if is_widget(spec):
                    item["widget"] = {"name": name}
                inputs.append(item)
        outputs = []
        for slot, kind in enumerate(entry["output"]):
            outputs.append({"name": entry.get("output_name", entry["output"])[slot], "type": kind,
                            "links": [lk[0] for lk in links if lk[1] == n.id and lk[2] == slot], "slot_index": slot})
        values = []
        for name in widget_names(entry):
            spec = input_spec(entry, name)
            values.append(n.values.get(name, _default(spec)))
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                values.append("fixed")
            if len(spec) > 1 and spec[1].get("image_upload"):
                values.append("image")
        ui_nodes.append({"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                         "order": order, "mode": 0, "inputs": inputs, "outputs": outputs, "title": n.title,
                         "properties": {"Node name for S&R": n.type}, "widgets_values": values})
    for lk in links:  # the UI format names the target slot by index
        target = next(u for u in ui_nodes if u["id"] == lk[3])
        lk[4] = next(i for i, item in enumerate(target["inputs"]) if item["name"] == lk[4])
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


# --- The workflows ------------------------------------------------------------------------------------------

PROMPT = "a painting"  # Stylora styles train against the empty prompt; a generic phrase does no harm
NEGATIVE = "photo, blurry, low quality"
SAMPLER = {"seed": 0, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}

BASIC_NOTE = """Stylora: style transfer with a style LoRA.

1. Load Checkpoint: an SD1.5 checkpoint.
2. Load Style LoRA: pick a style from models/styles (or models/loras); trained with `stylora train lora`.
3. Load Image (Content): your photo.
4. Content Encode: resizes to max_side (aspect kept, sides multiples of 8) and says what it did.
5. Style Strength: ONE knob, 0..1. 0 = the photo unchanged; ~0.3 recolours; 0.5 = the style's full weight;
   1 = strongest. It also sets KSampler's denoise (= strength x max_denoise), wired in.
6. KSampler: steps 20-30; the seed changes the brush work.

Headless: stylora run --server http://127.0.0.1:8188 --workflow style_transfer --content photo.jpg \
--style monet.safetensors --out out.png"""


def style_transfer(extra: dict | None = None) -> list[Node]:
    e = extra or {}
    return [
        Node(1, "CheckpointLoaderSimple", roles.CHECKPOINT.title, (0, 0), {"ckpt_name": CHECKPOINT},
             size=(320, 100)),
        Node(2, "LoadStyleLoRA", roles.STYLE.title, (360, 0), {"style": "monet.safetensors", "strength": 1.0,
                                                       **e.get("style", {})}, {"model": (1, 0), "clip": (1, 1)},
             size=(320, 220)),
        Node(3, "StyleStrength", roles.STRENGTH.title, (720, 0), {"strength": 0.5, "max_denoise": 0.75},
             {"model": (2, 0)}),
        Node(4, "CLIPTextEncode", "Positive prompt", (360, 260), {"text": PROMPT}, {"clip": (2, 1)}),
        Node(5, "CLIPTextEncode", "Negative prompt", (360, 440), {"text": NEGATIVE}, {"clip": (2, 1)}),
        Node(6, "LoadImage", roles.CONTENT.title, (0, 160), {"image": "stylora_content.jpg"}, size=(320, 360)),
        Node(7, "ContentEncode", "Content encode", (0, 560), {}, {"image": (6, 0), "vae": (1, 2)}, size=(320, 220)),
        Node(8, "KSampler", roles.SAMPLER.title, (720, 180), SAMPLER, {"model": (3, 0), "positive": (4, 0),
                                                              "negative": (5, 0), "latent_image": (7, 0),
                                                              "denoise": (3, 1)}, size=(320, 270)),
        Node(9, "VAEDecode", "Decode", (1080, 0), {}, {"samples": (8, 0), "vae": (1, 2)}, size=(220, 50)),
        Node(10, "SaveImage", "Save", (1080, 100), {"filename_prefix": "stylora/styled"}, {"images": (9, 0)},
             size=(400, 420)),
        note(11, (1080, 560), BASIC_NOTE),
    ]


def masked_style() -> list[Node]:
    nodes = [n for n in style_transfer() if n.id not in (9, 10, 11)]
    nodes[5] = Node(6, "LoadImage", roles.CONTENT.title, (0, 160), {"image": "stylora_content_masked.png"},
                    size=(320, 360))
    nodes += [
        Node(12, "MaskedStyleApply", "Mask the latent", (360, 620), {"feather": 16, "invert": False},
             {"content": (7, 1), "mask": (6, 1), "latent": (7, 0)}, size=(320, 170)),
        Node(9, "VAEDecode", "Decode", (1080, 0), {}, {"samples": (8, 0), "vae": (1, 2)}, size=(220, 50)),
        Node(13, "MaskedStyleApply", "Composite", (1080, 100), {"feather": 16, "invert": False},
             {"content": (7, 1), "mask": (6, 1), "styled": (9, 0)}, size=(320, 170)),
        Node(10, "SaveImage", "Save", (1440, 0), {"filename_prefix": "stylora/masked"}, {"images": (13, 0)},
             size=(400, 420)),
        note(11, (1080, 320), """Stylora: style only inside a mask.

Right-click the Content image > Open in MaskEditor, paint where the style goes, save.
The first Masked Style Apply limits the sampler to the mask (latent noise mask); the second
composites after decoding: every pixel outside the mask is the photo's, exactly; the seam is
feathered inward over `feather` px. invert = style everything but the mask.
Several regions with several styles: copy this group, and feed this Composite in as the next
pass's Content (chained passes keep each other's pixels).

Headless: stylora run ... --workflow masked_style --content photo.jpg --mask mask.png (white = style)"""),
    ]
    nodes[7].links["latent_image"] = (12, 1)
    return nodes


def style_blend() -> list[Node]:
    nodes = style_transfer({"style": {"style_2": "ukiyo-e.safetensors", "weight_2": 1.0}})
    nodes[-1] = note(11, (1080, 560), """Stylora: blending styles.

Load Style LoRA blends up to three styles: style (weight 1), style_2 and style_3 with their weights;
the weights are normalised to sum to 1, then scaled by strength. Chaining several Load Style LoRA
nodes works too (each adds its style at its own strength); Style Strength scales all of them.

Headless: stylora run ... --workflow style_blend --style monet.safetensors --style ukiyo-e.safetensors:0.5""")
    nodes[-2].values["filename_prefix"] = "stylora/blend"
    return nodes


def style_metrics() -> list[Node]:
    nodes = style_transfer()
    nodes[-2].values["filename_prefix"] = "stylora/metrics"
    nodes[-1] = note(11, (1440, 560), """Stylora: style transfer, then its metrics on the node.

Style Metrics compares the styled image with the content photo at the same size (Content Encode's
image output): SSIM, LPIPS, VGG content loss; Gram style loss against the Style image; FID/KID/ArtFID
when style_folder names a folder of style images on the server and the batch has 2+ images.
csv_path appends one row per run. Metrics whose network weights are missing say which file to get.

Headless: stylora run ... --workflow style_metrics --content photo.jpg --style monet.safetensors \
--style-image painting.jpg""")
    nodes += [
        Node(12, "LoadImage", roles.STYLE_IMAGE.title, (1440, 0), {"image": "stylora_style.jpg"}, size=(320, 300)),
        Node(13, "StyleMetrics", "Metrics", (1440, 340), {"style_folder": "", "csv_path": "", "label": "monet"},
             {"content": (7, 1), "styled": (9, 0), "style": (12, 0)}, size=(420, 200)),
    ]
    return nodes


def dreambooth() -> list[Node]:
    return [
        Node(1, "CheckpointLoaderSimple", roles.STYLE_CHECKPOINT.title, (0, 0),
             {"ckpt_name": "stylora_dreambooth.safetensors"}, size=(320, 100)),
        Node(4, "CLIPTextEncode", "Positive prompt", (360, 0), {"text": "sks style painting"}, {"clip": (1, 1)}),
        Node(5, "CLIPTextEncode", "Negative prompt", (360, 200), {"text": NEGATIVE}, {"clip": (1, 1)}),
        Node(6, "LoadImage", roles.CONTENT.title, (0, 160), {"image": "stylora_content.jpg"}, size=(320, 360)),
        Node(7, "ContentEncode", "Content encode", (0, 560), {}, {"image": (6, 0), "vae": (1, 2)}, size=(320, 220)),
        Node(8, "KSampler", roles.SAMPLER.title, (720, 0), {**SAMPLER, "cfg": 7.0, "denoise": 0.6},
             {"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (7, 0)}, size=(320, 270)),
        Node(9, "VAEDecode", "Decode", (1080, 0), {}, {"samples": (8, 0), "vae": (1, 2)}, size=(220, 50)),
        Node(10, "SaveImage", "Save", (1080, 100), {"filename_prefix": "stylora/dreambooth"}, {"images": (9, 0)},
             size=(400, 420)),
        note(11, (720, 320), """Stylora: the DreamBooth baseline.

Load the checkpoint written by `stylora train dreambooth` (models/checkpoints) and prompt with its
identifier, "sks style painting". denoise sets how much of the photo is repainted (0.6 default).
Compare with the style-LoRA workflows using Style Metrics or `stylora eval`.

Headless: stylora run ... --workflow dreambooth --content photo.jpg --style my_dreambooth.safetensors"""),
    ]


WORKFLOWS = {"style_transfer": style_transfer, "masked_style": masked_style, "style_blend": style_blend,
             "style_metrics": style_metrics, "dreambooth": dreambooth}


def trimmed(object_info: dict, types: set[str]) -> dict:
    """The schema facts the offline check needs (names, types, order, limits, small option lists), no prose."""
    out = {}
    for t in sorted(types):
        entry = object_info[t]
        inputs = {}
        for group, specs in entry["input"].items():
            if group == "hidden":
                continue
            inputs[group] = {}
            for name, spec in specs.items():
                opts = {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items()
                        if k in ("default", "min", "max", "control_after_generate", "image_upload")}
                kind = spec[0] if not isinstance(spec[0], list) or name in ("sampler_name", "scheduler",
                                                                            "channel") else []
                inputs[group][name] = [kind, opts]
        out[t] = {"input": inputs, "input_order": entry.get("input_order", {}), "output": entry["output"],
                  "output_name": entry.get("output_name", entry["output"])}
    return out


def make_example_inputs() -> None:
    """Example inputs from scikit-image's public-domain NASA photos: a content photo, the same photo with a painted
    mask (alpha 0 where the style goes, as ComfyUI's mask editor saves it), that mask as black/white, a style image."""
    import numpy as np
    from PIL import Image, ImageDraw
    from skimage import data

    out = REPO / "examples"
    photo = Image.fromarray(data.astronaut())  # 512x512
    photo.save(out / "stylora_content.jpg", quality=90)
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).ellipse((20, 40, 300, 500), fill=255)  # the left half: background and shoulder
    mask.save(out / "stylora_mask.png", optimize=True)
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(255 - np.asarray(mask)))
    rgba.save(out / "stylora_content_masked.png", optimize=True)
    Image.fromarray(data.hubble_deep_field()[:512, :512]).save(out / "stylora_style.jpg", quality=90)


def main(object_info_path: Path = DEFAULT_OBJECT_INFO) -> None:
    make_example_inputs()
    object_info = json.loads(object_info_path.read_text())
    schema = {**object_info, **our_schema()}
    core_used: set[str] = set()
    for name, build in WORKFLOWS.items():
        nodes = build()
        core_used |= {n.type for n in nodes if n.type in object_info}
        (REPO / "examples" / f"{name}.json").write_text(json.dumps(to_ui(nodes, schema), indent=1) + "\n")
        (REPO / "workflows" / "api").mkdir(parents=True, exist_ok=True)
        (REPO / "workflows" / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes, schema), indent=1) + "\n")
    CORE_SUBSET.write_text(json.dumps(trimmed(object_info, core_used), indent=1) + "\n")
    print(f"wrote {len(WORKFLOWS)} workflows (examples/*.json, workflows/api/*.json) and {CORE_SUBSET.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OBJECT_INFO)
