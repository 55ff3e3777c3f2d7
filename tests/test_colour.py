"""Keep Photo Colours (luminance-only transfer, Gatys et al., CVPR 2017): exact photo chroma at amount 1, the
styled image untouched at 0, the photo bit for bit outside a mask; checked against a plain reference written here
from the Y'CbCr definition (BT.601 full range, JPEG), not from the library's constants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stylora import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from stylora.core.colour import keep_colours
from stylora.nodes.colour import KeepPhotoColours
from stylora.nodes.mask import MaskedStyleApply

KR, KB = 0.299, 0.114  # BT.601: Y' = KR R + (1 - KR - KB) G + KB B


def ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Reference: [..., 3] RGB -> [..., 3] Y'CbCr, Cb = (B - Y') / (2 (1 - KB)), Cr = (R - Y') / (2 (1 - KR))."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = KR * r + (1 - KR - KB) * g + KB * b
    return np.stack([y, (b - y) / (2 * (1 - KB)), (r - y) / (2 * (1 - KR))], -1)


def rgb_from(ycc: np.ndarray) -> np.ndarray:
    """Reference inverse: solve the 3x3 system numerically (no hand-written inverse coefficients)."""
    forward = ycbcr(np.eye(3)).T  # columns: the images of the unit R, G, B vectors
    return ycc @ np.linalg.inv(forward).T


def images(seed: int, low: float = 0.0, high: float = 1.0, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    photo = low + (high - low) * torch.rand(1, size, size, 3, generator=gen, dtype=torch.float64)
    styled = low + (high - low) * torch.rand(2, size, size, 3, generator=gen, dtype=torch.float64)
    return photo, styled


def test_amount_one_is_the_reference_recombination_with_the_photos_chroma():
    # Mid-range pixels: photo chroma + styled luma stays in gamut, so the result is the paper's recombination.
    photo, styled = images(0, 0.35, 0.65)
    out = keep_colours(photo, styled, 1.0).numpy()
    p, s = ycbcr(photo.expand_as(styled).numpy()), ycbcr(styled.numpy())
    expected = rgb_from(np.concatenate([s[..., :1], p[..., 1:]], -1))
    assert np.abs(out - expected).max() < 1e-9
    assert np.abs(ycbcr(out)[..., 1:] - p[..., 1:]).max() < 1e-12  # chroma: the photo's
    assert np.abs(ycbcr(out)[..., 0] - s[..., 0]).max() < 1e-12  # luma: the style's


def test_chroma_stays_exact_out_of_gamut_and_the_output_stays_in_range():
    photo, styled = images(1)  # full range: many pixels where photo chroma + styled luma leaves 0..1
    out = keep_colours(photo, styled, 1.0).numpy()
    p = ycbcr(photo.expand_as(styled).numpy())
    assert out.min() >= -1e-12 and out.max() <= 1 + 1e-12
    assert np.abs(ycbcr(out)[..., 1:] - p[..., 1:]).max() < 1e-12
    clipped = np.abs(ycbcr(out)[..., 0] - ycbcr(styled.numpy())[..., 0]) > 1e-9
    assert 0.05 < clipped.mean() < 0.95  # the case is exercised: only the luminance gave way, where it had to


def test_eight_bit_chroma_matches_the_photos_within_rounding():
    from PIL import Image

    photo, styled = images(2, 0.2, 0.8, size=64)
    out = keep_colours(photo.float(), styled[:1].float(), 1.0)

    def pil_ycbcr(t: torch.Tensor) -> np.ndarray:
        pixels = (t[0].numpy() * 255).round().astype(np.uint8)
        return np.asarray(Image.fromarray(pixels).convert("YCbCr")).astype(int)

    assert np.abs(pil_ycbcr(out)[..., 1:] - pil_ycbcr(photo.float())[..., 1:]).max() <= 1


def test_amount_zero_is_the_styled_image_and_amounts_between_mix_linearly():
    photo, styled = images(3)
    assert torch.equal(keep_colours(photo, styled, 0.0), styled)
    full = keep_colours(photo, styled, 1.0)
    assert torch.allclose(keep_colours(photo, styled, 0.25), styled + 0.25 * (full - styled), atol=1e-12)


def test_unstyled_pixels_stay_the_photo_bit_for_bit_before_or_after_the_mask_composite():
    photo, _ = images(4, size=32)
    photo = photo.float()
    styled = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 4:20] = 1
    node, colours = MaskedStyleApply(), KeepPhotoColours()
    for amount in (0.3, 1.0):
        before = node.apply(photo, mask, 4, False, styled=colours.apply(photo, styled, amount)[0])[0]
        after = colours.apply(photo, node.apply(photo, mask, 4, False, styled=styled)[0], amount)[0]
        for out in (before, after):
            outside = (mask == 0)[0]
            assert torch.equal(out[0][outside], photo[0][outside])
            assert (out[0][~outside] != photo[0][~outside]).any()


def test_node_is_registered_and_names_bad_input():
    assert NODE_CLASS_MAPPINGS["KeepPhotoColours"] is KeepPhotoColours
    assert NODE_DISPLAY_NAME_MAPPINGS["KeepPhotoColours"] == "Keep Photo Colours (Stylora)"
    photo, styled = images(6)
    with pytest.raises(ValueError, match="amount must be in 0..1.*1.5"):
        KeepPhotoColours().apply(photo, styled, 1.5)
    with pytest.raises(ValueError, match="KeepPhotoColours: photo is 24x24 and styled 16x24"):
        KeepPhotoColours().apply(photo, styled[:, :, :16], 1.0)
    with pytest.raises(ValueError, match="photo batch 3 does not match styled batch 2"):
        KeepPhotoColours().apply(photo.expand(3, -1, -1, -1), styled, 1.0)


def test_every_bundled_workflow_keeps_colours_on_the_way_to_save_and_run_sets_the_amount():
    from stylora.workflows.client import RunConfig, bundled_workflows, load_workflow, substitute

    for name in bundled_workflows():
        graph = load_workflow(name)
        colours = [i for i, n in graph.items() if n["class_type"] == "KeepPhotoColours"]
        assert len(colours) == 1, name
        node = graph[colours[0]]
        assert node["inputs"]["amount"] == 0.0  # the bundled look is the style's colours
        assert graph[node["inputs"]["styled"][0]]["class_type"] == "VAEDecode"
        # Save's image comes from the colour node, directly or through the mask composite.
        save = next(n for n in graph.values() if n["class_type"] == "SaveImage")
        src = graph[save["inputs"]["images"][0]]
        if src["class_type"] == "MaskedStyleApply":
            src = graph[src["inputs"]["styled"][0]]
        assert src is node, name
        cfg = RunConfig(content="p.png", out="o.png", workflow=name, keep_colours=0.8)
        assert substitute(graph, cfg, "p.png", None)[colours[0]]["inputs"]["amount"] == 0.8
    with pytest.raises(ValueError, match="keep_colours must be in 0..1, got 2"):
        RunConfig(content="p.png", out="o.png", keep_colours=2.0)


def test_tensors_that_are_not_image_batches_are_named():
    photo, styled = images(3)
    with pytest.raises(ValueError, match=r"must be IMAGE \[B, H, W, 3\], got \(24, 24, 3\)"):
        keep_colours(photo[0], styled, 1.0)
    with pytest.raises(ValueError, match=r"must be IMAGE \[B, H, W, 3\]"):
        keep_colours(photo, styled[..., :2], 1.0)


def test_node_declares_two_images_and_an_amount_from_zero_to_one():
    """What the canvas draws: content and styled IMAGE sockets, the amount widget 0..1 in steps of 0.05, default 1
    (the node's purpose is the photo's colours)."""
    required = KeepPhotoColours.INPUT_TYPES()["required"]
    assert list(required) == ["content", "styled", "amount"]
    assert required["content"][0] == required["styled"][0] == "IMAGE"
    kind, opts = required["amount"]
    assert kind == "FLOAT" and (opts["default"], opts["min"], opts["max"], opts["step"]) == (1.0, 0.0, 1.0, 0.05)
