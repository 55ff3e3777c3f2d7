"""Masked Style Apply's mask arithmetic on values worked out by hand (fit, feather, composite)."""

from __future__ import annotations

import logging

import pytest
import torch
from stylora.nodes.mask import MaskedStyleApply, composite, fit_mask


def test_fit_mask_clamps_to_0_1_and_inverts_after_clamping():
    mask = torch.tensor([[[-0.5, 0.25], [1.0, 1.5]]])
    assert fit_mask(mask, 2, 2).tolist() == [[[0.0, 0.25], [1.0, 1.0]]]
    assert fit_mask(mask, 2, 2, invert=True).tolist() == [[[1.0, 0.75], [0.0, 0.0]]]
    assert fit_mask(mask[0], 2, 2).shape == (1, 2, 2)  # a MASK without batch gets one


def test_the_node_shows_its_documented_defaults_and_ranges():
    required = MaskedStyleApply.INPUT_TYPES()["required"]
    feather = required["feather"][1]
    assert (feather["default"], feather["min"], feather["max"], feather["step"]) == (16, 0, 512, 1)
    assert required["invert"][1]["default"] is False


def test_composite_blends_by_weight_and_keeps_content_exactly_where_the_weight_is_0():
    content = torch.full((1, 1, 3, 3), 0.2)
    styled = torch.full((1, 1, 3, 4), 0.6)  # an extra (alpha) channel on the styled image is dropped
    weights = torch.tensor([[[0.0, 0.5, 1.0]]])
    out = composite(content, styled, weights)
    assert out.shape == (1, 1, 3, 3)
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.2, 0.4, 0.6]))


def test_feather_keeps_the_batch_for_full_and_empty_masks():
    from stylora.nodes.mask import feather_mask

    masks = torch.stack([torch.ones(8, 8), torch.zeros(8, 8), torch.zeros(8, 8)])
    masks[2, 2:6, 2:6] = 1
    out = feather_mask(masks, 4)
    assert out.shape == (3, 8, 8)
    assert torch.equal(out[0], torch.ones(8, 8)) and torch.equal(out[1], torch.zeros(8, 8))
    # A 4x4 square with feather 4: half-width 2, so the ramp is d / 2 -> smoothstep: 0.5 on the rim, 1 inside.
    assert out[2, 2, 2].item() == 0.5 and out[2, 3, 3].item() == 1.0 and out[2, 1, 1].item() == 0.0


def test_fit_mask_resizes_bilinearly_with_pixel_centres_aligned():
    """2 -> 4 pixels, half-pixel centres (align_corners=False, as Pillow and ComfyUI resize): 0, 1/4, 3/4, 1."""
    mask = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert fit_mask(mask, 4, 4)[0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]


def test_feather_ramp_uses_the_largest_distance_within_feather_pixels():
    """A 1-px line leaving a 5x5 block, feather 4: on the line 4 px from the block's centre (distance 3 to the
    edge) the ramp's half-width is 3, so the weight is smoothstep(1/3); a window of 3 px would see at most 2.24."""
    from stylora.nodes.mask import feather_mask

    mask = torch.zeros(1, 15, 25)
    mask[0, 5:10, 5:10] = 1
    mask[0, 7, 10:21] = 1
    r = 1 / 3
    assert feather_mask(mask, 4)[0, 7, 11].item() == pytest.approx(r * r * (3 - 2 * r), rel=1e-6)


def test_resize_and_narrowing_are_logged_with_their_numbers(caplog):
    from stylora.nodes.mask import feather_mask

    with caplog.at_level(logging.INFO, logger="stylora.nodes.mask"):
        fit_mask(torch.zeros(1, 2, 3), 4, 6)
        square = torch.zeros(1, 8, 8)
        square[0, 2:6, 2:6] = 1
        feather_mask(square, 4)
    assert "mask 3x2 resized to the content's 6x4" in caplog.text
    assert "feather narrowed to the stroke's half-width on 16 of 16 painted pixels" in caplog.text
