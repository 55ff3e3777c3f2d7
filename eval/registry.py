"""The metrics, one entry each: what it compares, the network it needs, which way is better, its description and
its paper, and how it is computed. The Style Metrics node, `stylora eval` and `stylora study` all take their metric
names, tables and scores from here (eval/scoring.py runs the entries), so a new metric is one entry here.

Kept free of torch at import (the score functions import the networks' module when they run): the command line
builds its parser, and the study checks its settings, without loading the feature networks' libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PAIR = "pair"  # one value per styled image, against its content photo or the style set
SET = "set"  # one value per set of styled images, against the style set

# What a metric compares a styled image with (the scorer skips a metric whose target is not given):
CONTENT = "content"  # the content photo, same size, [B, 3, H, W] in 0..1
STYLE_IMAGES = "style_images"  # the style images, scaled to cover the output's size (LPIPS to the style)
STYLE_GRAMS = "style_grams"  # the style set's mean Gram matrices (VGG-19)
STYLE_FEATURES = "style_features"  # the style set's Inception pool features [N, 2048]


# KID's defaults, as in Binkowski et al. 2018 and torch-fidelity: 100 random subsets of 1000 (capped by the sets).
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


@dataclass(frozen=True)
class PairInputs:
    """A batch of styled images and what they are compared with. Tensors are [B, 3, H, W] float in 0..1 on one
    device; `nets` maps a network name (NETWORKS) to the loaded network."""

    styled: Any
    nets: dict[str, Any]
    content: Any = None
    style_images: Any = None  # a scoring.StyleSet: the style images at any output size
    style_grams: Any = None  # list of [1, C, C] Gram matrices, one per VGG-19 style layer


@dataclass
class SetInputs:
    """Inception features [N, 2048] of the styled set and of the style set, the means of the pair metrics over the
    set, and the KID settings. FID is computed once and shared by FID and ArtFID."""

    features: Any
    style_features: Any
    means: dict[str, float]
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    fid_value: float | None = None

    def fid(self) -> float:
        if self.fid_value is None:
            self.fid_value = _metrics().fid(self.features, self.style_features)
        return self.fid_value


@dataclass(frozen=True)
class Metric:
    name: str = field(metadata={"help": "the name in flags, files and tables"})
    scope: str = field(metadata={"help": "PAIR: one value per styled image; SET: one per set of styled images"})
    target: str = field(metadata={"help": "what a styled image is compared with: CONTENT, STYLE_IMAGES, "
                                          "STYLE_GRAMS or STYLE_FEATURES"})
    networks: tuple[str, ...] = field(metadata={"help": "the feature networks it needs (keys of NETWORKS)"})
    higher_is_better: bool = field(metadata={"help": "which way is better, for the tables' arrows"})
    label: str = field(metadata={"help": "short column title in the study's tables"})
    description: str = field(metadata={"help": "one line for reports and the node's text"})
    reference: str = field(metadata={"help": "the paper that defines it"})
    score: Callable[[Any], Any] = field(metadata={
        "help": "PAIR: PairInputs -> [B] tensor; SET: SetInputs -> {name: value} (KID adds kid_std); raises "
                "ValueError or RuntimeError when the inputs cannot be scored (e.g. too small)"})
    in_study: bool = field(default=True, metadata={"help": "a column of `stylora study`'s tables (and its default)"})


def _metrics() -> Any:
    """eval/metrics.py, imported when a network is built or a metric computed."""
    from . import metrics  # heavy: torch and the feature networks

    return metrics


# --- The networks: name -> builder with the published weights (metrics.py loads them; a missing weights file
#     raises weights.WeightsUnavailable, which makes the metrics needing it unavailable) ---

def _lpips_alex() -> Any:
    return _metrics().LPIPS("alex")


def _lpips_vgg() -> Any:
    return _metrics().LPIPS("vgg")


def _vgg19() -> Any:
    return _metrics().VGGStyle()


def _inception() -> Any:
    return _metrics().InceptionFeatures()


NETWORKS: dict[str, Callable[[], Any]] = {"lpips": _lpips_alex, "lpips_vgg": _lpips_vgg, "vgg": _vgg19,
                                          "inception": _inception}


# --- The score functions ---

def _ssim(x: PairInputs) -> Any:
    return _metrics().ssim(x.styled, x.content)


def _lpips(x: PairInputs) -> Any:
    return x.nets["lpips"](x.styled, x.content)


def _lpips_vgg_score(x: PairInputs) -> Any:
    return x.nets["lpips_vgg"](x.styled, x.content)


def _content(x: PairInputs) -> Any:
    return x.nets["vgg"].content_loss(x.styled, x.content)


def _lpips_style(x: PairInputs) -> Any:
    h, w = x.styled.shape[-2:]
    return _metrics().lpips_to_style(x.nets["lpips"], x.styled, x.style_images.at_size(w, h).to(x.styled.device))


def _gram(x: PairInputs) -> Any:
    return x.nets["vgg"].gram_loss(x.styled, x.style_grams)


def _fid(s: SetInputs) -> dict[str, float]:
    return {"fid": s.fid()}


def _kid(s: SetInputs) -> dict[str, float]:
    mean, std = _metrics().kid(s.features, s.style_features, s.kid_subsets, s.kid_subset_size)
    return {"kid": mean, "kid_std": std}


def _artfid(s: SetInputs) -> dict[str, float]:
    if s.means.get("lpips") is None:
        raise ValueError("needs the mean LPIPS to the content photos (lpips), which is not available")
    return {"artfid": _metrics().artfid(s.means["lpips"], s.fid())}


_LPIPS_PAPER = "Zhang et al., The Unreasonable Effectiveness of Deep Features as a Perceptual Metric, CVPR 2018"
_GATYS_PAPER = "Gatys, Ecker and Bethge, Image Style Transfer Using Convolutional Neural Networks, CVPR 2016"
_FID_PAPER = ("Heusel et al., GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium, "
              "NeurIPS 2017")

# In report order: pair metrics first, then set metrics (ArtFID reads the mean LPIPS of the pairs).
METRICS: tuple[Metric, ...] = (
    Metric("ssim", PAIR, CONTENT, (), True, "SSIM", "SSIM to the content photo (structure kept)",
           "Wang et al., Image Quality Assessment: From Error Visibility to Structural Similarity, IEEE TIP 2004",
           _ssim),
    Metric("lpips", PAIR, CONTENT, ("lpips",), False, "LPIPS", "LPIPS (AlexNet) to the content photo",
           _LPIPS_PAPER, _lpips),
    # Left out of the study's tables: the same measure as LPIPS with another backbone and weights file.
    Metric("lpips_vgg", PAIR, CONTENT, ("lpips_vgg",), False, "LPIPS (VGG)", "LPIPS (VGG-16) to the content photo",
           _LPIPS_PAPER, _lpips_vgg_score, in_study=False),
    Metric("content", PAIR, CONTENT, ("vgg",), False, "content",
           "VGG-19 relu4_2 content loss to the content photo", _GATYS_PAPER, _content),
    Metric("lpips_style", PAIR, STYLE_IMAGES, ("lpips",), False, "LPIPS to style",
           "LPIPS (AlexNet) to the style images, mean over the style set",
           _LPIPS_PAPER + "; as a style distance in Chung et al., StyleID, CVPR 2024", _lpips_style),
    Metric("gram", PAIR, STYLE_GRAMS, ("vgg",), False, "Gram",
           "Gram style loss to the style set's mean Gram matrices (VGG-19)", _GATYS_PAPER, _gram),
    Metric("fid", SET, STYLE_FEATURES, ("inception",), False, "FID", "FID of the outputs against the style set",
           _FID_PAPER, _fid),
    Metric("kid", SET, STYLE_FEATURES, ("inception",), False, "KID", "KID of the outputs against the style set",
           "Binkowski et al., Demystifying MMD GANs, ICLR 2018", _kid),
    Metric("artfid", SET, STYLE_FEATURES, ("lpips", "inception"), False, "ArtFID",
           "ArtFID = (1 + LPIPS) * (1 + FID)",
           "Wright and Ommer, ArtFID: Quantitative Evaluation of Neural Style Transfer, GCPR 2022", _artfid),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
ALL_METRICS = tuple(m.name for m in METRICS)
PAIR_METRICS = tuple(m.name for m in METRICS if m.scope == PAIR)
SET_METRICS = tuple(m.name for m in METRICS if m.scope == SET)
STUDY_METRICS = tuple(m.name for m in METRICS if m.in_study)
HIGHER_IS_BETTER = {m.name: m.higher_is_better for m in METRICS}
DESCRIPTION = {m.name: m.description for m in METRICS}


def check_names(names: tuple[str, ...] | list[str], key: str) -> None:
    """Raise ValueError naming `key` when a name is not a metric."""
    unknown = sorted(set(names) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"{key}: unknown {unknown}; choose from {list(ALL_METRICS)}")


def arrow(name: str) -> str:
    """↑ when higher is better, ↓ when lower is."""
    return "↑" if BY_NAME[name].higher_is_better else "↓"
