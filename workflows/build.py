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
# SD1.5 Canny ControlNet 1.1 (Zhang et al. 2023) in the fp16 copy ComfyUI's own templates download
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
# Public files a template names, as ComfyUI's own templates carry them on the loader node (`properties.models`):
# the frontend's missing-models dialog offers each one's download into its models folder.
MODEL_FILES = {
    CHECKPOINT: {"name": CHECKPOINT, "directory": "checkpoints",
                 "url": f"https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/{CHECKPOINT}"},
    CONTROLNET: {"name": CONTROLNET, "directory": "controlnet",
                 "url": f"https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/{CONTROLNET}"},
}
# Files a person makes with the trainer: the placeholder names say so (no download exists).
STYLE_PLACEHOLDER = "my_style (stylora train lora).safetensors"
STYLE_PLACEHOLDER_2 = "my_second_style (stylora train lora).safetensors"
DREAMBOOTH_PLACEHOLDER = "my_dreambooth (stylora train dreambooth).safetensors"


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
                         "properties": node_properties(n), "widgets_values": values})
    for lk in links:  # the UI format names the target slot by index
        target = next(u for u in ui_nodes if u["id"] == lk[3])
        lk[4] = next(i for i, item in enumerate(target["inputs"]) if item["name"] == lk[4])
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


# --- The workflows ------------------------------------------------------------------------------------------

# Styles train against the empty prompt (or a trigger), so the positive prompt is the style's trigger, taken from
# Load Style LoRA's `trigger` output, and the negative prompt is empty. CFG 1: the sampler sees the conditional
# prediction the LoRA was trained for; for a promptless style positive and negative are the same prompt, so any
# CFG gives the same image, and at CFG 1 ComfyUI skips the unconditional pass (half the sampling time).
NEGATIVE = ""
SAMPLER = {"seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}
TITLE_H = 30  # the frontend draws a node's title bar above its pos
GAP = 40  # between nodes, vertically and horizontally
GROWS = {"StyleMetrics": 320}  # extra height a node takes after a run (Style Metrics' text), kept free below it

# One line per workflow (the Note's first line and `extra.stylora.description`), in the order from first
# steps to advanced.
DESCRIPTIONS = {
    "style_transfer": "Style transfer: a photo and a style LoRA in, the photo in that style out, one strength knob.",
    "masked_style": "Masked style: the style only where a mask is painted; every other pixel stays the photo's.",
    "style_blend": "Style blend: two styles mixed by weight in one Load Style LoRA node.",
    "style_metrics": "Style metrics: style transfer, then SSIM, LPIPS, content and Gram losses on the node.",
    "style_from_image": "Style from one painting: no training, the painting's style injected into the UNet "
                        "(StyleID).",
    "layout_guard": "Layout guard: strength up to denoise 1 while a Canny ControlNet holds the photo's edges.",
    "dreambooth": "DreamBooth baseline: the same photo styled by a DreamBooth checkpoint, for comparison.",
    "textual_inversion": "Textual Inversion baseline: the style as a learned prompt word, embedding:<name>.",
    "train_style": "Train a style: a folder of paintings in, a style LoRA out, then the photo styled with it.",
}


def node_properties(n: Node) -> dict[str, Any]:
    """A UI node's properties: its search name and the public model files its widgets name (MODEL_FILES)."""
    models = [MODEL_FILES[v] for v in n.values.values() if isinstance(v, str) and v in MODEL_FILES]
    return {"Node name for S&R": n.type, **({"models": models} if models else {})}


def layout(*columns: list[Node]) -> list[Node]:
    """Place columns of nodes left to right, each stacked top to bottom, so no two nodes overlap: title bars
    included, and the room a node grows into after a run (GROWS) left free below it. Returns all nodes."""
    x, out = 0, []
    for column in columns:
        y = 0
        for n in column:
            n.pos = (x, y + TITLE_H)
            y += TITLE_H + n.size[1] + GROWS.get(n.type, 0) + GAP
        x += max(n.size[0] for n in column) + GAP
        out += column
    return out


def _nodes(extra: dict | None = None) -> dict[int, Node]:
    """The style-transfer graph's nodes by id (positions are set by `layout`)."""
    e = extra or {}
    nodes = [
        Node(1, "CheckpointLoaderSimple", roles.CHECKPOINT.title, (0, 0), {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        Node(2, "LoadStyleLoRA", roles.STYLE.title, (0, 0), {"style": STYLE_PLACEHOLDER, "strength": 1.0,
                                                   **e.get("style", {})}, {"model": (1, 0), "clip": (1, 1)},
             size=(320, 320)),  # the height the Vue node renderer (frontend 1.5x) gives its six widgets
        Node(3, "StyleStrength", roles.STRENGTH.title, (0, 0), {"strength": 0.5, "max_denoise": 0.75},
             {"model": (2, 0), "clip": (2, 1)}, size=(320, 210)),
        Node(4, "CLIPTextEncode", "Positive prompt", (0, 0), {"text": ""}, {"clip": (3, 2), "text": (2, 3)},
             size=(320, 150)),
        Node(5, "CLIPTextEncode", "Negative prompt", (0, 0), {"text": NEGATIVE}, {"clip": (3, 2)}, size=(320, 150)),
        Node(6, "LoadImage", roles.CONTENT.title, (0, 0), {"image": "stylora_content.jpg"}, size=(320, 360)),
        Node(7, "ContentEncode", "Content encode", (0, 0), {}, {"image": (6, 0), "vae": (1, 2)}, size=(320, 250)),
        Node(8, "KSampler", roles.SAMPLER.title, (0, 0), SAMPLER, {"model": (3, 0), "positive": (4, 0),
                                                                   "negative": (5, 0), "latent_image": (7, 0),
                                                                   "denoise": (3, 1)},
             size=(320, 270)),
        Node(9, "VAEDecode", "Decode", (0, 0), {}, {"samples": (8, 0), "vae": (1, 2)}, size=(220, 50)),
        Node(10, "SaveImage", "Save", (0, 0), {"filename_prefix": "stylora/styled"}, {"images": (20, 0)},
             size=(400, 420)),
        # amount 0: the style's colours, as without the node; raise it to keep the photo's colours.
        Node(20, "KeepPhotoColours", roles.COLOURS.title, (0, 0), {"amount": 0.0},
             {"content": (7, 1), "styled": (9, 0)}, size=(320, 110)),
    ]
    return {n.id: n for n in nodes}


BASIC_NOTE = DESCRIPTIONS["style_transfer"] + """

1. Load Checkpoint: an SD1.5 checkpoint.
2. Load Style LoRA: pick a style from models/styles (or models/loras); trained with `stylora train lora`.
   Its trigger output is the prompt the style was trained with (empty for promptless styles).
3. Load Image (Content): your photo.
4. Content Encode: resizes to max_side (aspect kept, sides multiples of 8) and says what it did.
5. Style Strength: ONE knob, 0..1. 0 = the photo unchanged; ~0.3 recolours; 0.5 = the style's full weight;
   1 = strongest. It also sets KSampler's denoise and scales the text encoder, both wired in.
6. KSampler: steps 20-30, CFG 1 (the style is trained without a prompt); the seed changes the brush work.
7. Keep colours: amount 0 = the style's colours; 1 = the photo's colours under the style's strokes and shading.

Headless: stylora run --server http://127.0.0.1:8188 --workflow style_transfer --content photo.jpg \
--style monet.safetensors --out out.png"""


def note_for(name: str, body: str) -> Node:
    return note(11, (0, 0), DESCRIPTIONS[name] + "\n\n" + body)


def style_transfer(extra: dict | None = None) -> list[Node]:
    n = _nodes(extra)
    return layout([n[1], n[6], n[7]], [n[2], n[3], n[4], n[5]], [n[8], n[9], n[20]],
                  [n[10], note(11, (0, 0), BASIC_NOTE)])


def masked_style() -> list[Node]:
    n = _nodes()
    n[6].values["image"] = "stylora_content_masked.png"
    n[7].links["mask"] = (6, 1)  # the mask gets the photo's resize and crop
    n[10].values["filename_prefix"] = "stylora/masked"
    n[10].links["images"] = (13, 0)
    n[8].links["latent_image"] = (12, 1)
    latent = Node(12, "MaskedStyleApply", "Mask the latent", (0, 0), {"feather": 16, "invert": False},
                  {"content": (7, 1), "mask": (7, 3), "latent": (7, 0)}, size=(320, 150))
    composite = Node(13, "MaskedStyleApply", "Composite", (0, 0), {"feather": 16, "invert": False},
                     {"content": (7, 1), "mask": (7, 3), "styled": (20, 0)}, size=(320, 150))
    text = note_for("masked_style", """\
Right-click the Content image > Open in MaskEditor, paint where the style goes, save.
Content Encode resizes and crops the mask exactly like the photo. The first Masked Style Apply limits
the sampler to the mask (latent noise mask); the second composites after decoding: every pixel outside
the mask is the photo's, exactly; the seam is feathered inward over `feather` px (narrower in thin
strokes, so every painted pixel is styled). invert = style everything but the mask.
Several regions with several styles: copy this group, and feed this Composite in as the next
pass's Content (chained passes keep each other's pixels).

Headless: stylora run ... --workflow masked_style --content photo.jpg --mask mask.png (white = style)""")
    return layout([n[1], n[6], n[7]], [n[2], n[3], n[4], n[5]], [latent, n[8], n[9], n[20]],
                  [composite, n[10], text])


def style_blend() -> list[Node]:
    n = _nodes({"style": {"style_2": STYLE_PLACEHOLDER_2, "weight_2": 1.0}})
    n[10].values["filename_prefix"] = "stylora/blend"
    text = note_for("style_blend", """\
Load Style LoRA blends up to three styles: style (weight 1), style_2 and style_3 with their weights;
the weights are normalised to sum to 1, then scaled by strength. Chaining several Load Style LoRA
nodes works too (each adds its style at its own strength); Style Strength scales all of them.

Headless: stylora run ... --workflow style_blend --style monet.safetensors --style ukiyo-e.safetensors:0.5""")
    return layout([n[1], n[6], n[7]], [n[2], n[3], n[4], n[5]], [n[8], n[9], n[20]], [n[10], text])


def style_metrics() -> list[Node]:
    n = _nodes()
    n[10].values["filename_prefix"] = "stylora/metrics"
    style_image = Node(12, "LoadImage", roles.STYLE_IMAGE.title, (0, 0), {"image": "stylora_style.jpg"},
                       size=(320, 320))
    metrics = Node(13, "StyleMetrics", "Metrics", (0, 0), {"style_folder": "", "csv_path": "", "label": "my_style"},
                   {"content": (7, 1), "styled": (20, 0), "style": (12, 0)}, size=(420, 170))
    text = note_for("style_metrics", """\
Style Metrics compares the styled image with the content photo at the same size (Content Encode's
image output): SSIM, LPIPS, VGG content loss; Gram style loss against the Style image; FID/KID/ArtFID
when style_folder names a folder of style images on the server and the batch has 2+ images.
csv_path appends one row per run. The numbers show on the node after a run; a metric whose network
weights are missing shows "n/a" and the file to put in ComfyUI/models/stylora_metrics/ (README).

Headless: stylora run ... --workflow style_metrics --content photo.jpg --style monet.safetensors \
--style-image painting.jpg""")
    return layout([n[1], n[6], n[7]], [n[2], n[3], n[4], n[5]], [n[8], n[9], n[20]], [n[10], text],
                  [style_image, metrics])


def dreambooth() -> list[Node]:
    n = _nodes()
    n[1] = Node(1, "CheckpointLoaderSimple", roles.STYLE_CHECKPOINT.title, (0, 0),
                {"ckpt_name": DREAMBOOTH_PLACEHOLDER}, size=(320, 100))
    n[4] = Node(4, "CLIPTextEncode", "Positive prompt", (0, 0), {"text": "sks style painting"}, {"clip": (1, 1)},
                size=(320, 150))
    n[5].links["clip"] = (1, 1)
    n[5].values["text"] = "photo, blurry, low quality"
    n[8].values.update(cfg=7.0, denoise=0.6)  # DreamBooth is trained with its prompt and sampled with CFG
    n[8].links = {"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (7, 0)}
    n[10].values["filename_prefix"] = "stylora/dreambooth"
    text = note_for("dreambooth", """\
Load the checkpoint written by `stylora train dreambooth` (models/checkpoints) and prompt with its
identifier, "sks style painting" (CFG 7, as DreamBooth is trained with a prompt). denoise sets how
much of the photo is repainted (0.6 default). Compare with the style-LoRA workflows using Style
Metrics or `stylora eval`.

Headless: stylora run ... --workflow dreambooth --content photo.jpg --style my_dreambooth.safetensors""")
    return layout([n[1], n[6], n[7]], [n[4], n[5]], [n[8], n[9], n[20]], [n[10], text])


def style_from_image() -> list[Node]:
    n = _nodes()
    painting = Node(12, "LoadImage", roles.STYLE_IMAGE.title, (0, 0), {"image": "stylora_style.jpg"},
                    size=(320, 320))
    # paper mode: StyleID's inversion runs inside KSampler (the node's sampler wrapper), along KSampler's own
    # sigmas, under the negative prompt (empty here, as StyleID's unconditional inversion); the seed is not used.
    inject = Node(13, "StyleFromImage", "Style from image", (0, 0), {"mode": "paper"},
                  {"model": (1, 0), "style_image": (12, 0), "vae": (1, 2), "latent": (7, 0)}, size=(320, 380))
    n[3].links = {"model": (13, 0), "clip": (1, 1)}
    n[4].links = {"clip": (3, 2)}  # no trigger: the painting's style comes from the attention, not the prompt
    n[10].values["filename_prefix"] = "stylora/from_image"
    text = note_for("style_from_image", """\
Style From Image (Chung et al., CVPR 2024, StyleID): in the UNet decoder's self-attention the photo keeps
its queries and takes keys and values from the painting's features at the same step; gamma blends the
queries (0.75: more layout), temperature sharpens the attention (1.5), adain moves the latent's colour
statistics toward the painting's. mode paper (as published): KSampler first DDIM-inverts the photo and the
painting along its own steps and starts from their AdaIN (keep the negative prompt empty; the seed does
nothing); mode fast: no inversion, the seed's noise. No training, one painting. Style Strength drives it
like a LoRA style (0 = the photo unchanged). About twice plain img2img per photo at CFG 1; the painting's
features are computed once and reused for the next photos.

Headless: stylora run ... --workflow style_from_image --content photo.jpg --style-image painting.jpg""")
    return layout([n[1], n[6], n[7]], [painting, inject], [n[3], n[4], n[5]], [n[8], n[9], n[20]], [n[10], text])


def layout_guard() -> list[Node]:
    n = _nodes()
    n[3].values["max_denoise"] = 1.0  # the guard holds the layout, so strength may repaint everything
    n[10].values["filename_prefix"] = "stylora/layout_guard"
    edges = Node(30, "Canny", "Edges", (0, 0), {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (7, 1)},
                 size=(320, 110))
    loader = Node(31, "ControlNetLoader", roles.CONTROLNET.title, (0, 0), {"control_net_name": CONTROLNET},
                  size=(320, 80))
    guard = Node(32, "ControlNetApplyAdvanced", "Layout guard", (0, 0), {"start_percent": 0.0, "end_percent": 1.0},
                 {"positive": (4, 0), "negative": (5, 0), "control_net": (31, 0), "image": (30, 0),
                  "strength": (3, 3)}, size=(320, 230))
    n[8].links.update(positive=(32, 0), negative=(32, 1))
    text = note_for("layout_guard", f"""\
Style Strength drives three things here: the style's weight, KSampler's denoise (max_denoise 1.0:
strength 1 repaints everything) and, through its guard output, the ControlNet's strength (= denoise),
so the photo's Canny edges hold what the sampler repaints. One knob; raise it until the layout gives.
ControlNet: put {CONTROLNET} (comfyanonymous/ControlNet-v1-1_fp16_safetensors,
the fp16 copy of lllyasviel's Canny ControlNet 1.1) in ComfyUI/models/controlnet.
Edges: Canny thresholds 0.4/0.8 (lower: more edges).

Headless: stylora run ... --workflow layout_guard --content photo.jpg --style monet.safetensors --strength 0.9""")
    return layout([n[1], n[6], n[7], edges], [n[2], n[3], n[4], n[5]], [loader, guard, n[8]], [n[9], n[20], n[10]],
                  [text])


def textual_inversion() -> list[Node]:
    n = _nodes()
    n[4] = Node(4, "CLIPTextEncode", "Positive prompt", (0, 0),
                {"text": "a painting in the style of embedding:stylora_style"}, {"clip": (1, 1)}, size=(320, 150))
    n[5].links["clip"] = (1, 1)
    n[8].values.update(cfg=5.0, denoise=0.6)  # the embedding is a prompt word: it acts through CFG
    n[8].links = {"model": (1, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (7, 0)}
    n[10].values["filename_prefix"] = "stylora/textual_inversion"
    text = note_for("textual_inversion", """\
Put the embedding written by `stylora train textual-inversion` into models/embeddings and name its
file in the prompt: "a painting in the style of embedding:<file name>" (the shipped prompt expects
stylora_style.safetensors). Only the text encoder's input changes (Gal et al., ICLR 2023); the
checkpoint is the plain SD1.5 one, sampled at CFG 5. denoise sets how much of the photo is repainted.

Headless: stylora run ... --workflow textual_inversion --content photo.jpg \
--set 'Positive prompt.text=a painting in the style of embedding:my_style'""")
    return layout([n[1], n[6], n[7]], [n[4], n[5]], [n[8], n[9], n[20]], [n[10], text])


def train_style() -> list[Node]:
    n = _nodes()
    train = Node(12, "TrainStyle", roles.TRAIN.title, (0, 0), {"ckpt_name": CHECKPOINT, "folder": "paintings",
                                                             "name": "my_style"},
                 {"model": (1, 0), "clip": (1, 1)}, size=(320, 330))
    n[3].links = {"model": (12, 0), "clip": (12, 1)}
    n[4].links = {"clip": (3, 2)}  # the trained style is promptless: the positive prompt stays empty
    n[10].values["filename_prefix"] = "stylora/trained"
    text = note_for("train_style", """\
1. Put 5+ paintings (50-100 for a good style) in ComfyUI/input/paintings/ (or another folder there, named in
   `folder`); broken and tiny files are skipped and listed in the log.
2. Train Style LoRA: the same checkpoint as Load Checkpoint, a name, and the trainer's settings
   (6000 steps at 512 px suit 50-100 paintings; `stylora train lora`'s defaults for everything else).
   It writes models/styles/<name>.safetensors; Load Style LoRA lists it from then on.
3. Queue. The node's bar counts the steps. Cancel stops after the current step and keeps a checkpoint:
   queue again to continue. Queued again when finished, the style is reused, not trained again.
4. The photo below is styled with the new style through Style Strength, as in style_transfer.
Training runs where ComfyUI runs (a GPU: 512 px on a 16 GB T4; a CPU: very slow; see README).

Headless: stylora run --workflow train_style --content photo.jpg --set "Train style.name=monet" \
--set "Train style.folder=paintings/monet" --out out.png""")
    return layout([n[1], train], [n[6], n[7]], [n[3], n[4], n[5]], [n[8], n[9], n[20]], [n[10], text])


WORKFLOWS = {"style_transfer": style_transfer, "masked_style": masked_style, "style_blend": style_blend,
             "style_metrics": style_metrics, "style_from_image": style_from_image, "layout_guard": layout_guard,
             "dreambooth": dreambooth,
             "textual_inversion": textual_inversion, "train_style": train_style}  # first steps to advanced


def ui_workflow(name: str, schema: dict[str, dict]) -> dict[str, Any]:
    """examples/<name>.json: the UI graph with its one-line description in `extra`."""
    ui = to_ui(WORKFLOWS[name](), schema)
    ui["extra"]["stylora"] = {"description": DESCRIPTIONS[name], "order": list(WORKFLOWS).index(name) + 1}
    return ui


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


THUMB_TITLES = {"style_transfer": ("Style transfer", "photo", "styled"),
                "masked_style": ("Masked style", "photo + mask", "styled in mask"),
                "style_blend": ("Style blend", "photo", "two styles"),
                "style_metrics": ("Style metrics", "styled", "scores"),
                "style_from_image": ("Style from a painting", "painting", "styled"),
                "layout_guard": ("Layout guard", "photo edges", "styled, layout kept"),
                "dreambooth": ("DreamBooth baseline", "photo", "DreamBooth"),
                "textual_inversion": ("Textual Inversion", "photo", "embedding"),
                "train_style": ("Train a style", "paintings", "styled")}


def make_thumbnails() -> None:
    """examples/<name>.jpg, the Templates browser's picture of each workflow (256x176): a title, the input and
    what comes out, drawn from the example photo and mask. The "styled" panels are an illustration (mode filter,
    posterise, a painter's palette), not a model's output: the builder needs no checkpoint."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

    out = REPO / "examples"
    side = 104
    photo = Image.open(out / "stylora_content.jpg").convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    style = ((40, 25, 70), (205, 85, 55), (255, 225, 130))  # dark, mid, light: a warm oil palette
    other = ((15, 30, 60), (60, 130, 170), (235, 230, 205))  # a second style: ukiyo-e blues
    mask = Image.open(out / "stylora_mask.png").convert("L").resize((side, side), Image.Resampling.LANCZOS)

    def painted(palette: tuple) -> Image.Image:
        flat = ImageOps.grayscale(ImageOps.posterize(photo.filter(ImageFilter.ModeFilter(7)), 3))
        return Image.blend(photo, ImageOps.colorize(flat, palette[0], palette[2], palette[1]), 0.75)

    def paintings(size: int) -> Image.Image:
        """Four small 'paintings' in the style's palette: crops of the example photo, painted."""
        full = painted(style).resize((size * 2, size * 2), Image.Resampling.LANCZOS)
        grid = Image.new("RGB", (size, size), (255, 255, 255))
        half = size // 2 - 2
        for i, (x, y) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            tile = full.crop((x * size, y * size, x * size + size, y * size + size)).resize((half, half))
            grid.paste(tile.rotate(90 * i), (x * (half + 4), y * (half + 4)))
        return grid

    def bars() -> Image.Image:
        panel = Image.new("RGB", (side, side), (245, 245, 245))
        d = ImageDraw.Draw(panel)
        for i, (label, length) in enumerate((("SSIM", 70), ("LPIPS", 40), ("Gram", 55), ("FID", 85))):
            d.text((4, 8 + i * 24), label, fill=(40, 40, 40), font=ImageFont.load_default(11))
            d.rectangle((44, 10 + i * 24, 44 + length * 0.6, 20 + i * 24), fill=(76, 114, 176))
        return panel

    right = {"style_transfer": painted(style), "masked_style": Image.composite(painted(style), photo, mask),
             "style_blend": Image.fromarray(np.concatenate([np.asarray(painted(style))[:, : side // 2],
                                                            np.asarray(painted(other))[:, side // 2:]], 1)),
             "style_metrics": bars(), "style_from_image": painted(style), "dreambooth": painted(other),
             "layout_guard": painted(style), "textual_inversion": painted(other),
             "train_style": painted(style)}
    left = {"masked_style": Image.composite(Image.new("RGB", photo.size, (255, 255, 255)), photo,
                                            mask.point(lambda v: v // 2)),
            "style_metrics": painted(style),
            "style_from_image": Image.open(out / "stylora_style.jpg").convert("RGB").resize(
                (side, side), Image.Resampling.LANCZOS),
            "layout_guard": ImageOps.invert(photo.convert("L").filter(ImageFilter.FIND_EDGES).point(
                lambda v: 255 if v > 40 else 0)).convert("RGB"),
            "train_style": paintings(side)}
    for name, (title, left_label, right_label) in THUMB_TITLES.items():
        canvas = Image.new("RGB", (256, 176), (255, 255, 255))
        d = ImageDraw.Draw(canvas)
        d.rectangle((0, 0, 255, 27), fill=(36, 41, 56))
        d.text((8, 5), title, fill=(255, 255, 255), font=ImageFont.load_default(15))
        canvas.paste(left.get(name, photo), (12, 36))
        canvas.paste(right[name], (140, 36))
        d.polygon(((120, 80), (132, 88), (120, 96)), fill=(36, 41, 56))
        small = ImageFont.load_default(11)
        d.text((12, 146), left_label, fill=(60, 60, 60), font=small)
        d.text((140, 146), right_label, fill=(60, 60, 60), font=small)
        canvas.save(out / f"{name}.jpg", quality=85)


def main(object_info_path: Path = DEFAULT_OBJECT_INFO) -> None:
    make_example_inputs()
    make_thumbnails()
    object_info = json.loads(object_info_path.read_text())
    schema = {**object_info, **our_schema()}
    core_used: set[str] = set()
    for name, build in WORKFLOWS.items():
        nodes = build()
        core_used |= {n.type for n in nodes if n.type in object_info}
        (REPO / "examples" / f"{name}.json").write_text(json.dumps(ui_workflow(name, schema), indent=1) + "\n")
        (REPO / "workflows" / "api").mkdir(parents=True, exist_ok=True)
        (REPO / "workflows" / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes, schema), indent=1) + "\n")
    CORE_SUBSET.write_text(json.dumps(trimmed(object_info, core_used), indent=1) + "\n")
    print(f"wrote {len(WORKFLOWS)} workflows (examples/*.json, workflows/api/*.json) and {CORE_SUBSET.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OBJECT_INFO)
