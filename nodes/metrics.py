"""StyleMetrics: how much structure the styled image kept and how close it came to the style, shown on the node.

A thin layer over `eval.scoring.score_images`: every metric of eval/registry.py, scored by the same functions as
`stylora eval`. Feature networks are loaded once per node and kept; metrics whose published weights are not on the
machine are listed as unavailable with the file to get, the rest are still reported.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from ..eval.registry import ALL_METRICS
from ..eval.scoring import append_csv, format_scores, json_safe, load_nets, score_images
from .host import torch_device

logger = logging.getLogger(__name__)

METRIC_CHOICES = ALL_METRICS


class StyleMetrics:
    """Scores styled images against their content photo (and a style image or folder); shows the numbers."""

    CATEGORY = "Stylora"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("text", "json")
    OUTPUT_TOOLTIPS = (
        "The metrics as readable lines (wire to Preview Any, or read them on this node).",
        "The metrics as JSON: means, per-image values and the reason for each unavailable metric.",
    )
    DESCRIPTION = ("SSIM, LPIPS and VGG content loss against the content photo; LPIPS to the style and Gram style "
                   "loss against a style image or folder; FID/KID/ArtFID against a style folder (for batches of 2 or "
                   "more). Optionally appends a row to a CSV file.")

    def __init__(self) -> None:
        self._nets: dict[str, torch.nn.Module] = {}  # kept between runs: loading VGG-19 takes seconds
        self._unavailable: dict[str, str] | None = None  # metric -> why its network could not be loaded

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "content": ("IMAGE", {"tooltip": "The content photo at the styled image's size (ContentEncode's "
                                                 "image output)."}),
                "styled": ("IMAGE", {"tooltip": "The styled image(s), e.g. from VAE Decode."}),
            },
            "optional": {
                "style": ("IMAGE", {"tooltip": "A style image (any size), for the Gram style loss and LPIPS to "
                                                         "the style."}),
                "style_folder": ("STRING", {"default": "", "tooltip": "A folder of style images on the server, for "
                                                                      "the Gram loss, LPIPS to the style and "
                                                                      "FID/KID/ArtFID."}),
                "csv_path": ("STRING", {"default": "", "tooltip": "Append one row per run to this CSV file "
                                                                  "(empty: none)."}),
                "label": ("STRING", {"default": "", "tooltip": "A name for this run in the CSV (e.g. the style)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> str:
        # A style folder's contents can change while the inputs stay the same: then always measure again.
        return str(time.time()) if str(kwargs.get("style_folder", "")).strip() else ""

    def measure(self, content: torch.Tensor, styled: torch.Tensor, style: torch.Tensor | None = None,
                style_folder: str = "", csv_path: str = "", label: str = ""):
        device = torch_device()
        # 1. Networks, looked up once per node: what is missing stays listed as unavailable, not retried each run.
        if self._unavailable is None:
            self._nets, self._unavailable = load_nets(set(METRIC_CHOICES))
        wanted = tuple(m for m in METRIC_CHOICES if m not in self._unavailable)
        # 2. Scores, text and JSON.
        scores = score_images(content, styled, style, style_folder.strip() or None, wanted, self._nets, device)
        scores["unavailable"] = {**self._unavailable, **scores["unavailable"]}
        scores = json_safe(scores)  # NaN/inf -> None: what goes to the browser must be valid JSON
        text = format_scores(scores)
        as_json = json.dumps(scores, indent=1, allow_nan=False)
        (logger.warning if any(scores["nonfinite_pixels"]) else logger.info)("StyleMetrics:\n%s", text)
        # 3. Optional CSV row.
        if csv_path.strip():
            append_csv(csv_path.strip(), {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "label": label,
                                          "images": scores["images"], **scores["metrics"]})
        return {"ui": {"text": [text], "stylora_metrics": [scores]}, "result": (text, as_json)}

