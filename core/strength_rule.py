"""The strength rule: one knob s in 0..1 -> the style's LoRA weight, KSampler's denoise and the layout guard's
(ControlNet's) weight, and, for a calibrated style, the remap that makes s mean the same content preservation for
every style. Plain Python (no torch), read by the Style Strength node and by `stylora run`.

Today's ramps (uncalibrated styles):

    lora_scale(s) = min(1, s / FULL_STYLE_AT)      the style's trained weight is reached at s = 0.5
    denoise(s)    = s * max_denoise                 max_denoise = 0.75 by default
    guard(s)      = denoise(s)                      the ControlNet holds what the sampler may repaint

Calibration. `stylora calibrate` measures a style's mean SSIM to the photo at raw strengths r_0 = 0 < ... < r_n = 1
(Wang et al. 2004; the content-preservation axis of the study). The curve is made non-increasing (isotonic
regression, pool-adjacent-violators) and strength s is given the SSIM of one shared target line,

    target(s) = ssim(0) - s * (ssim(0) - TARGET_SSIM_AT_FULL)

then mapped to the raw strength r whose measured SSIM is target(s) (linear interpolation; clamped to 1 when the
style never gets that far from the photo, so the remap is monotone and stays in 0..1). ssim(0) is the VAE round
trip of the photo, the same for every style on the same base model and photos, so a given s aims at the same SSIM
for every calibrated style; s = 0 stays exactly 0. A blend of styles takes the blend-weighted mean of its styles'
raw strengths when every style is calibrated, and today's ramps otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

FULL_STYLE_AT = 0.5  # strength at which the LoRA reaches its trained weight
DEFAULT_MAX_DENOISE = 0.75
# SSIM to the photo that strength 1 aims at on a calibrated style: far from the photo but short of a new picture
# (the random-init end of SDEdit's realism-faithfulness trade-off, Meng et al. 2022). A convention shared by all
# calibrated styles, stored with each calibration.
TARGET_SSIM_AT_FULL = 0.35
CALIBRATION_KEY = "stylora.calibration"  # the style file's metadata key
# The img2img denoise suggested where no strength knob sets it: written into each trained style's metadata
# (stylora.suggested_denoise) and used by the baseline workflows' samplers (DreamBooth, Textual Inversion). It is
# today's ramp at strength 0.8 (0.8 * DEFAULT_MAX_DENOISE): a strong style that still keeps the photo's layout.
SUGGESTED_DENOISE = 0.6


def style_schedule(strength: float, max_denoise: float = DEFAULT_MAX_DENOISE) -> tuple[float, float]:
    """strength in 0..1 -> (LoRA weight multiplier in 0..1, KSampler denoise in 0..max_denoise)."""
    if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in 0..1, got {strength}")
    if not (isinstance(max_denoise, (int, float)) and 0.0 <= max_denoise <= 1.0):
        raise ValueError(f"max_denoise must be in 0..1, got {max_denoise}")
    return min(1.0, strength / FULL_STYLE_AT), strength * max_denoise


def guard_weight(strength: float, max_denoise: float = DEFAULT_MAX_DENOISE) -> float:
    """The layout guard's (ControlNet's) weight for a strength: the denoise itself, 0..max_denoise. What the sampler
    may repaint is what the photo's edges must hold; at denoise 0 nothing is repainted and no guard is needed."""
    return style_schedule(strength, max_denoise)[1]


@dataclass(frozen=True)
class Calibration:
    """A style's measured SSIM-vs-strength curve, as stored in its file's metadata (JSON under CALIBRATION_KEY)."""

    strengths: tuple[float, ...] = field(metadata={"help": "raw strengths measured, ascending, from 0 to 1"})
    ssim: tuple[float, ...] = field(metadata={"help": "mean SSIM to the photos at each strength"})
    max_denoise: float = field(default=DEFAULT_MAX_DENOISE, metadata={"help": "Style Strength's max_denoise used"})
    target_ssim_at_full: float = field(default=TARGET_SSIM_AT_FULL,
                                       metadata={"help": "the SSIM strength 1 aims at (the rule's convention)"})
    photos: int = field(default=0, metadata={"help": "how many content photos the means are over"})
    details: dict[str, Any] = field(default_factory=dict,
                                    metadata={"help": "how it was measured: workflow, seed, steps, base model, date"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        object.__setattr__(self, "ssim", tuple(float(v) for v in self.ssim))
        s, v = self.strengths, self.ssim
        if len(s) < 2 or len(s) != len(v):
            raise ValueError(f"calibration: need 2+ strengths with one SSIM each, got {len(s)} strengths and "
                             f"{len(v)} SSIM values")
        if s[0] != 0.0 or s[-1] != 1.0 or any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"calibration: strengths must rise from 0 to 1, got {list(s)}")
        if not all(math.isfinite(x) and -1.0 <= x <= 1.0 for x in v):
            raise ValueError(f"calibration: SSIM values must be finite, in -1..1, got {list(v)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            data = json.loads(text)
            return cls(strengths=tuple(data["strengths"]), ssim=tuple(data["ssim"]),
                       max_denoise=float(data.get("max_denoise", DEFAULT_MAX_DENOISE)),
                       target_ssim_at_full=float(data.get("target_ssim_at_full", TARGET_SSIM_AT_FULL)),
                       photos=int(data.get("photos", 0)), details=dict(data.get("details", {})))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{CALIBRATION_KEY}: not a calibration ({e}): {text[:200]!r}") from e


def read_calibration(metadata: dict[str, str]) -> Calibration | None:
    """A style file's calibration, or None for an uncalibrated style (ValueError for a damaged entry)."""
    text = metadata.get(CALIBRATION_KEY)
    return None if text is None else Calibration.from_json(text)


def decreasing_fit(values: tuple[float, ...] | list[float]) -> list[float]:
    """The closest non-increasing sequence in least squares (pool-adjacent-violators): a noisy SSIM curve, made
    monotone without moving points that already are."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, count = blocks.pop()
            prev = blocks[-1]
            prev[0] = (prev[0] * prev[1] + mean * count) / (prev[1] + count)
            prev[1] += count
    return [mean for mean, count in blocks for _ in range(int(count))]


def calibrated_strength(strength: float, calibration: Calibration) -> float:
    """The raw strength (what today's ramps take) that gives `strength`'s target SSIM on this style, in 0..1."""
    if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in 0..1, got {strength}")
    curve = decreasing_fit(calibration.ssim)
    top, floor = curve[0], calibration.target_ssim_at_full
    if strength == 0 or top <= floor:  # a curve that starts below the target says nothing: keep the ramps
        return float(strength)
    goal = top - strength * (top - floor)
    if goal <= curve[-1]:
        return 1.0  # the style never gets this far from the photo: its strongest setting
    r = calibration.strengths
    for i in range(len(curve) - 1):
        if curve[i + 1] <= goal < curve[i]:
            return r[i] + (curve[i] - goal) / (curve[i] - curve[i + 1]) * (r[i + 1] - r[i])
    return 0.0  # goal == top: only reached by rounding at tiny strengths


def blend_strength(strength: float, styles: list[tuple[Calibration | None, float]]) -> tuple[float, bool]:
    """(raw strength, calibrated?) for a model carrying `styles` as (calibration or None, blend weight). Calibrated
    only when there is at least one style and every style is: the blend-weighted mean of their raw strengths."""
    if not styles or any(cal is None for cal, _ in styles):
        style_schedule(strength)  # validates
        return float(strength), False
    total = sum(abs(w) for _, w in styles) or 1.0
    raw = sum(calibrated_strength(strength, cal) * abs(w) for cal, w in styles) / total
    return min(1.0, max(0.0, raw)), True
