"""The bundled workflows, one function per workflow, each a list of graph `Node`s wired by output name.

`tools/build_workflows.py` writes each one in both formats: UI (examples/<name>.json, the Templates browser) and
API (workflows/api/<name>.json, used by `stylora run`). Roles that `stylora run` substitutes are found by node title
(`_meta.title`); the titles come from workflows/roles.py, the one list both sides read.
"""

from __future__ import annotations

from typing import Any

from ..core.strength_rule import SUGGESTED_DENOISE
from . import roles
from .graph import Node, layout, note, to_ui

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


# --- The workflows ------------------------------------------------------------------------------------------

# Styles train against the empty prompt (or a trigger), so the positive prompt is the style's trigger, taken from
# Load Style LoRA's `trigger` output, and the negative prompt is empty. CFG 1: the sampler sees the conditional
# prediction the LoRA was trained for; for a promptless style positive and negative are the same prompt, so any
# CFG gives the same image, and at CFG 1 ComfyUI skips the unconditional pass (half the sampling time).
NEGATIVE = ""
SAMPLER = {"seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}

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


def _nodes(extra: dict | None = None) -> dict[int, Node]:
    """The style-transfer graph's nodes by id (positions are set by `layout`)."""
    e = extra or {}
    nodes = [
        Node(1, "CheckpointLoaderSimple", roles.CHECKPOINT.title, {"ckpt_name": CHECKPOINT}, size=(320, 100)),
        Node(2, "LoadStyleLoRA", roles.STYLE.title, {"style": STYLE_PLACEHOLDER, "strength": 1.0, **e.get("style", {})},
             {"model": (1, "MODEL"), "clip": (1, "CLIP")},
             size=(320, 320)),  # the height the Vue node renderer (frontend 1.5x) gives its six widgets
        Node(3, "StyleStrength", roles.STRENGTH.title, {"strength": 0.5, "max_denoise": 0.75},
             {"model": (2, "model"), "clip": (2, "clip")}, size=(320, 210)),
        Node(4, "CLIPTextEncode", "Positive prompt", {"text": ""}, {"clip": (3, "clip"), "text": (2, "trigger")},
             size=(320, 150)),
        Node(5, "CLIPTextEncode", "Negative prompt", {"text": NEGATIVE}, {"clip": (3, "clip")}, size=(320, 150)),
        Node(6, "LoadImage", roles.CONTENT.title, {"image": "stylora_content.jpg"}, size=(320, 360)),
        Node(7, "ContentEncode", "Content encode", {}, {"image": (6, "IMAGE"), "vae": (1, "VAE")}, size=(320, 250)),
        Node(8, "KSampler", roles.SAMPLER.title, dict(SAMPLER),
             {"model": (3, "model"), "positive": (4, "CONDITIONING"), "negative": (5, "CONDITIONING"),
              "latent_image": (7, "latent"), "denoise": (3, "denoise")},
             size=(320, 270)),
        Node(9, "VAEDecode", "Decode", {}, {"samples": (8, "LATENT"), "vae": (1, "VAE")}, size=(220, 50)),
        Node(10, "SaveImage", "Save", {"filename_prefix": "stylora/styled"}, {"images": (20, "image")},
             size=(400, 420)),
        # amount 0: the style's colours, as without the node; raise it to keep the photo's colours.
        Node(20, "KeepPhotoColours", roles.COLOURS.title, {"amount": 0.0},
             {"content": (7, "image"), "styled": (9, "IMAGE")}, size=(320, 110)),
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
    return note(11, DESCRIPTIONS[name] + "\n\n" + body)


def style_transfer(extra: dict | None = None) -> list[Node]:
    n = _nodes(extra)
    return layout([n[1], n[6], n[7]], [n[2], n[3], n[4], n[5]], [n[8], n[9], n[20]],
                  [n[10], note(11, BASIC_NOTE)])


def masked_style() -> list[Node]:
    n = _nodes()
    n[6].values["image"] = "stylora_content_masked.png"
    n[7].links["mask"] = (6, "MASK")  # the mask gets the photo's resize and crop
    n[10].values["filename_prefix"] = "stylora/masked"
    n[10].links["images"] = (13, "image")
    n[8].links["latent_image"] = (12, "latent")
    latent = Node(12, "MaskedStyleApply", "Mask the latent", {"feather": 16, "invert": False},
                  {"content": (7, "image"), "mask": (7, "mask"), "latent": (7, "latent")}, size=(320, 150))
    composite = Node(13, "MaskedStyleApply", "Composite", {"feather": 16, "invert": False},
                     {"content": (7, "image"), "mask": (7, "mask"), "styled": (20, "image")}, size=(320, 150))
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
    style_image = Node(12, "LoadImage", roles.STYLE_IMAGE.title, {"image": "stylora_style.jpg"},
                       size=(320, 320))
    metrics = Node(13, "StyleMetrics", "Metrics", {"style_folder": "", "csv_path": "", "label": "my_style"},
                   {"content": (7, "image"), "styled": (20, "image"), "style": (12, "IMAGE")}, size=(420, 170))
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
    n[1] = Node(1, "CheckpointLoaderSimple", roles.STYLE_CHECKPOINT.title,
                {"ckpt_name": DREAMBOOTH_PLACEHOLDER}, size=(320, 100))
    n[4] = Node(4, "CLIPTextEncode", "Positive prompt", {"text": "sks style painting"}, {"clip": (1, "CLIP")},
                size=(320, 150))
    n[5].links["clip"] = (1, "CLIP")
    n[5].values["text"] = "photo, blurry, low quality"
    n[8].values.update(cfg=7.0, denoise=SUGGESTED_DENOISE)  # DreamBooth is trained with its prompt and sampled with CFG
    n[8].links = {"model": (1, "MODEL"), "positive": (4, "CONDITIONING"), "negative": (5, "CONDITIONING"),
                  "latent_image": (7, "latent")}
    n[10].values["filename_prefix"] = "stylora/dreambooth"
    text = note_for("dreambooth", f"""\
Load the checkpoint written by `stylora train dreambooth` (models/checkpoints) and prompt with its
identifier, "sks style painting" (CFG 7, as DreamBooth is trained with a prompt). denoise sets how
much of the photo is repainted ({SUGGESTED_DENOISE} default). Compare with the style-LoRA workflows using Style
Metrics or `stylora eval`.

Headless: stylora run ... --workflow dreambooth --content photo.jpg --style my_dreambooth.safetensors""")
    return layout([n[1], n[6], n[7]], [n[4], n[5]], [n[8], n[9], n[20]], [n[10], text])


def style_from_image() -> list[Node]:
    n = _nodes()
    painting = Node(12, "LoadImage", roles.STYLE_IMAGE.title, {"image": "stylora_style.jpg"},
                    size=(320, 320))
    # paper mode: StyleID's inversion runs inside KSampler (the node's sampler wrapper), along KSampler's own
    # sigmas, under the negative prompt (empty here, as StyleID's unconditional inversion); the seed is not used.
    inject = Node(13, "StyleFromImage", "Style from image", {"mode": "paper"},
                  {"model": (1, "MODEL"), "style_image": (12, "IMAGE"), "vae": (1, "VAE"), "latent": (7, "latent")},
                  size=(320, 380))
    n[3].links = {"model": (13, "model"), "clip": (1, "CLIP")}
    n[4].links = {"clip": (3, "clip")}  # no trigger: the painting's style comes from the attention, not the prompt
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
    edges = Node(30, "Canny", "Edges", {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (7, "image")},
                 size=(320, 110))
    loader = Node(31, "ControlNetLoader", roles.CONTROLNET.title, {"control_net_name": CONTROLNET},
                  size=(320, 80))
    guard = Node(32, "ControlNetApplyAdvanced", "Layout guard", {"start_percent": 0.0, "end_percent": 1.0},
                 {"positive": (4, "CONDITIONING"), "negative": (5, "CONDITIONING"),
                  "control_net": (31, "CONTROL_NET"), "image": (30, "IMAGE"), "strength": (3, "guard")},
                 size=(320, 230))
    n[8].links.update(positive=(32, "positive"), negative=(32, "negative"))
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
    n[4] = Node(4, "CLIPTextEncode", "Positive prompt",
                {"text": "a painting in the style of embedding:stylora_style"}, {"clip": (1, "CLIP")}, size=(320, 150))
    n[5].links["clip"] = (1, "CLIP")
    n[8].values.update(cfg=5.0, denoise=SUGGESTED_DENOISE)  # the embedding is a prompt word: it acts through CFG
    n[8].links = {"model": (1, "MODEL"), "positive": (4, "CONDITIONING"), "negative": (5, "CONDITIONING"),
                  "latent_image": (7, "latent")}
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
    train = Node(12, "TrainStyle", roles.TRAIN.title, {"ckpt_name": CHECKPOINT, "folder": "paintings",
                                                       "name": "my_style"},
                 {"model": (1, "MODEL"), "clip": (1, "CLIP")}, size=(320, 330))
    n[3].links = {"model": (12, "model"), "clip": (12, "clip")}
    n[4].links = {"clip": (3, "clip")}  # the trained style is promptless: the positive prompt stays empty
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
    ui = to_ui(WORKFLOWS[name](), schema, MODEL_FILES)
    ui["extra"]["stylora"] = {"description": DESCRIPTIONS[name], "order": list(WORKFLOWS).index(name) + 1}
    return ui
