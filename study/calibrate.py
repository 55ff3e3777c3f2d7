"""`stylora calibrate`: measure one style's SSIM-to-the-photo against strength on a ComfyUI server and write the
curve into the style file's metadata, so Style Strength gives the same content preservation at a given strength for
every calibrated style (the rule: `core.strength_rule`).

The same machinery as `stylora study`: the bundled style_transfer workflow run headless (`workflows.client`) at each
strength with the style's calibration switched off (raw strengths, today's ramps), and SSIM (Wang et al. 2004) of
each output against its photo resized to the output's size, as the study scores it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from ..core.images import load_image
from ..core.lora_file import read_lora, update_metadata
from ..core.strength_rule import CALIBRATION_KEY, DEFAULT_MAX_DENOISE, Calibration
from ..eval.metrics import ssim
from ..eval.scoring import to_tensor
from ..workflows.client import RunConfig, load_workflow, parse_value, run_workflow
from ..workflows.roles import STRENGTH, find
from .config import CalibrateConfig

logger = logging.getLogger(__name__)


def photo_ssim(photo: Path, styled: Path) -> float:
    """SSIM of a stylised image against its photo resized (Lanczos) to the output's size, as the study scores it."""
    out = load_image(styled)
    content = load_image(photo).resize(out.size, Image.Resampling.LANCZOS)
    return float(ssim(to_tensor(out), to_tensor(content))[0])


def calibrate(cfg: CalibrateConfig, say: Callable[[str], None] = logger.info) -> Calibration:
    """Measure the style's mean SSIM at each strength and write the calibration into the style file."""
    # 1. The style file: readable, and the name the server knows it by.
    path = Path(cfg.style)
    _, meta = read_lora(path)
    name = cfg.style_name or path.name
    out = Path(cfg.out) if cfg.out else path.with_name(path.stem + ".calibration")
    # 2. Stylise every photo at every raw strength: the style's own calibration off, one seed for all.
    means, photos = [], 0
    for strength in cfg.strengths:
        folder = out / f"s{round(strength * 1000):04d}"  # no dot: `stylora run` reads a suffix as a file name
        run = RunConfig(content=cfg.content, out=str(folder), server=cfg.server, workflow=cfg.workflow, style=(name,),
                        strength=strength, seed=cfg.seed, checkpoint=cfg.checkpoint,
                        set=(*cfg.set, "Strength.use_calibration=false"), timeout=cfg.timeout,
                        overwrite=cfg.overwrite)
        result = run_workflow(run, say=say)
        if result.failed:
            raise RuntimeError(f"calibrate: {len(result.failed)} photo(s) failed at strength {strength:g}, e.g. "
                               f"{result.failed[0][0]}: {result.failed[0][1]}")
        # 3. SSIM of each output against its photo; the mean over photos is the curve's point.
        pairs = [(Path(p), Path(w[0])) for p, w, _ in result.done]
        pairs += [(Path(p), folder / f"{Path(p).stem}.png") for p in result.skipped]  # done by an earlier run
        scores = [photo_ssim(photo, styled) for photo, styled in pairs]
        if not scores or not all(math.isfinite(s) for s in scores):
            raise RuntimeError(f"calibrate: no finite SSIM at strength {strength:g} ({scores})")
        means.append(sum(scores) / len(scores))
        photos = len(scores)
        say(f"strength {strength:g}: mean SSIM {means[-1]:.4f} over {photos} photo(s)")
    # 4. The calibration, written into the style file atomically (tensors unchanged).
    max_denoise = _max_denoise(cfg)
    cal = Calibration(strengths=cfg.strengths, ssim=tuple(means), max_denoise=max_denoise, photos=photos,
                      details={"workflow": cfg.workflow, "seed": cfg.seed, "checkpoint": cfg.checkpoint or "",
                               "base_model": meta.get("stylora.base_model", ""), "content": str(cfg.content),
                               "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    update_metadata(path, {CALIBRATION_KEY: cal.to_json()})
    say(f"wrote the calibration into {path}")
    return cal


def _max_denoise(cfg: CalibrateConfig) -> float:
    """Style Strength's max_denoise in the measured workflow (a --set override wins)."""
    node = find(load_workflow(cfg.workflow), STRENGTH)
    value = node["inputs"].get("max_denoise", DEFAULT_MAX_DENOISE) if node else DEFAULT_MAX_DENOISE
    for item in cfg.set:
        target, _, text = item.partition("=")
        if target == f"{STRENGTH.title}.max_denoise":
            value = parse_value(text)
    return float(value)
