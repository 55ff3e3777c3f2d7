"""Writes the bundled workflows (workflows/definitions.py), each in both formats, and their example files.

    python tools/build_workflows.py [OBJECT_INFO_JSON]

UI format (drag onto the canvas, listed in ComfyUI's Templates browser) -> examples/<name>.json
API format (POST to /prompt, used by `stylora run`)                     -> workflows/api/<name>.json
Example inputs (photo, mask, painting) and the Templates thumbnails     -> examples/*.jpg, examples/*.png
The trimmed core-node schema the offline tests fall back on             -> tests/fixtures/core_nodes-0.3.64.json

The core nodes' schema is ComfyUI's /object_info (default: ../shared/comfyui/object_info-0.3.64.json); ours comes
from the pack's node declarations. A development tool: not part of the installed package (the pack imports
nothing from here), run from a clone with the pack installed (`pip install -e .`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from stylora.workflows.definitions import WORKFLOWS, ui_workflow
from stylora.workflows.graph import our_schema, to_api

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OBJECT_INFO = REPO.parent / "shared" / "comfyui" / "object_info-0.3.64.json"
CORE_SUBSET = REPO / "tests" / "fixtures" / "core_nodes-0.3.64.json"
THUMB_SIDE = 104  # a thumbnail panel's side, px
STYLE_PALETTE = ((40, 25, 70), (205, 85, 55), (255, 225, 130))  # dark, mid, light: a warm oil palette
OTHER_PALETTE = ((15, 30, 60), (60, 130, 170), (235, 230, 205))  # a second style: ukiyo-e blues


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


def painted(photo: Image.Image, palette: tuple) -> Image.Image:
    """The photo as an illustration of a style: mode filter, posterise, the palette (dark, light, mid)."""
    flat = ImageOps.grayscale(ImageOps.posterize(photo.filter(ImageFilter.ModeFilter(7)), 3))
    return Image.blend(photo, ImageOps.colorize(flat, palette[0], palette[2], palette[1]), 0.75)


def paintings(photo: Image.Image, size: int) -> Image.Image:
    """Four small 'paintings' in the style's palette: crops of the example photo, painted."""
    full = painted(photo, STYLE_PALETTE).resize((size * 2, size * 2), Image.Resampling.LANCZOS)
    grid = Image.new("RGB", (size, size), (255, 255, 255))
    half = size // 2 - 2
    for i, (x, y) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        tile = full.crop((x * size, y * size, x * size + size, y * size + size)).resize((half, half))
        grid.paste(tile.rotate(90 * i), (x * (half + 4), y * (half + 4)))
    return grid


def bars(side: int) -> Image.Image:
    """A bar chart of made-up scores: the picture of a metrics read-out."""
    panel = Image.new("RGB", (side, side), (245, 245, 245))
    d = ImageDraw.Draw(panel)
    for i, (label, length) in enumerate((("SSIM", 70), ("LPIPS", 40), ("Gram", 55), ("FID", 85))):
        d.text((4, 8 + i * 24), label, fill=(40, 40, 40), font=ImageFont.load_default(11))
        d.rectangle((44, 10 + i * 24, 44 + length * 0.6, 20 + i * 24), fill=(76, 114, 176))
    return panel


def make_thumbnails() -> None:
    """examples/<name>.jpg, the Templates browser's picture of each workflow (256x176): a title, the input and
    what comes out, drawn from the example photo and mask. The "styled" panels are an illustration (mode filter,
    posterise, a painter's palette), not a model's output: the builder needs no checkpoint."""
    out = REPO / "examples"
    side = THUMB_SIDE
    photo = Image.open(out / "stylora_content.jpg").convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    mask = Image.open(out / "stylora_mask.png").convert("L").resize((side, side), Image.Resampling.LANCZOS)
    style, other = painted(photo, STYLE_PALETTE), painted(photo, OTHER_PALETTE)
    right = {"style_transfer": style, "masked_style": Image.composite(style, photo, mask),
             "style_blend": Image.fromarray(np.concatenate([np.asarray(style)[:, : side // 2],
                                                            np.asarray(other)[:, side // 2:]], 1)),
             "style_metrics": bars(side), "style_from_image": style, "dreambooth": other,
             "layout_guard": style, "textual_inversion": other, "train_style": style}
    left = {"masked_style": Image.composite(Image.new("RGB", photo.size, (255, 255, 255)), photo,
                                            mask.point(lambda v: v // 2)),
            "style_metrics": style,
            "style_from_image": Image.open(out / "stylora_style.jpg").convert("RGB").resize(
                (side, side), Image.Resampling.LANCZOS),
            "layout_guard": ImageOps.invert(photo.convert("L").filter(ImageFilter.FIND_EDGES).point(
                lambda v: 255 if v > 40 else 0)).convert("RGB"),
            "train_style": paintings(photo, side)}
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
    # 1. The example inputs the workflows name, and the thumbnails drawn from them.
    make_example_inputs()
    make_thumbnails()
    # 2. Each workflow in both formats, against the core nodes' schema and ours.
    object_info = json.loads(object_info_path.read_text())
    schema = {**object_info, **our_schema()}
    core_used: set[str] = set()
    (REPO / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        nodes = build()
        core_used |= {n.type for n in nodes if n.type in object_info}
        (REPO / "examples" / f"{name}.json").write_text(json.dumps(ui_workflow(name, schema), indent=1) + "\n")
        (REPO / "workflows" / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes, schema), indent=1) + "\n")
    # 3. The core nodes' schema facts the offline tests need, for a clone without ../shared.
    CORE_SUBSET.write_text(json.dumps(trimmed(object_info, core_used), indent=1) + "\n")
    print(f"wrote {len(WORKFLOWS)} workflows (examples/*.json, workflows/api/*.json) and {CORE_SUBSET.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OBJECT_INFO)
