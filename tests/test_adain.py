"""The AdaIN baseline (Huang and Belongie, ICCV 2017): the published file layout, the AdaIN formula against an
independent plain implementation, weights lookup and the `stylora adain` command, all on random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import skimage_photos, skimage_textures
from PIL import Image
from stylora.baseline import adain as A
from stylora.eval.weights import WeightsUnavailable

# Module indices of the convolutions in the published files (naoto0804/pytorch-AdaIN net.py): the encoder's 1x1
# input conv, then a conv after every reflection pad, 3 modules (pad, conv, relu) per conv and a pool per stage.
ENCODER_CONVS = {0: (3, 3, 1), 2: (64, 3, 3), 5: (64, 64, 3), 9: (128, 64, 3), 12: (128, 128, 3),
                 16: (256, 128, 3), 19: (256, 256, 3), 22: (256, 256, 3), 25: (256, 256, 3), 29: (512, 256, 3),
                 32: (512, 512, 3), 35: (512, 512, 3), 38: (512, 512, 3), 42: (512, 512, 3), 45: (512, 512, 3),
                 48: (512, 512, 3), 51: (512, 512, 3)}
DECODER_CONVS = {1: (256, 512), 5: (256, 256), 8: (256, 256), 11: (256, 256), 14: (128, 256), 18: (128, 128),
                 21: (64, 128), 25: (64, 64), 28: (3, 64)}


def plain_adain(content: np.ndarray, style: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The paper's eq. 8 in numpy, one image [C, H, W] at a time: per channel, the content's mean and standard
    deviation (unbiased variance + eps) replaced by the style's."""
    out = np.empty_like(content, dtype=np.float64)
    for c in range(content.shape[0]):
        x, y = content[c].astype(np.float64), style[c].astype(np.float64)
        sx, sy = np.sqrt(x.var(ddof=1) + eps), np.sqrt(y.var(ddof=1) + eps)
        out[c] = (x - x.mean()) / sx * sy + y.mean()
    return out


def _random_files(folder):
    """Random weights in the published files' layout, saved under the published names."""
    folder.mkdir(parents=True, exist_ok=True)
    enc, dec = A.encoder_layers(), A.decoder_layers()
    torch.manual_seed(0)
    for m in list(enc) + list(dec):
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
            torch.nn.init.normal_(m.bias, std=0.01)
    torch.save(enc.state_dict(), folder / "vgg_normalised.pth")
    torch.save(dec.state_dict(), folder / "decoder.pth")
    return enc.state_dict(), dec.state_dict()


def test_the_layers_match_the_published_files_key_for_key():
    enc, dec = A.encoder_layers().state_dict(), A.decoder_layers().state_dict()
    assert set(enc) == {f"{i}.{p}" for i in ENCODER_CONVS for p in ("weight", "bias")}
    for i, (cout, cin, k) in ENCODER_CONVS.items():
        assert enc[f"{i}.weight"].shape == (cout, cin, k, k)
    assert set(dec) == {f"{i}.{p}" for i in DECODER_CONVS for p in ("weight", "bias")}
    for i, (cout, cin) in DECODER_CONVS.items():
        assert dec[f"{i}.weight"].shape == (cout, cin, 3, 3)
    assert len(A.encoder_layers()) == 53 and A.RELU4_1 == 31  # relu4_1 is module 30


def test_adain_matches_the_plain_formula():
    g = torch.Generator().manual_seed(1)
    content = torch.randn(2, 5, 6, 7, generator=g) * 3 + 1
    style = torch.randn(1, 5, 9, 4, generator=g) * 0.5 - 2  # another size, one style for both contents
    got = A.adaptive_instance_norm(content, style).double().numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], plain_adain(content[b].numpy(), style[0].numpy()), rtol=1e-5, atol=1e-5)


def test_the_network_decodes_the_adain_features_blended_by_alpha():
    """output = decoder(alpha * AdaIN(f(c), f(s)) + (1 - alpha) * f(c)), the AdaIN step by the plain formula."""
    model = A.AdaIN(pretrained=False, seed=3)
    photo = torch.from_numpy(np.asarray(Image.fromarray(skimage_photos()["coffee"]).resize((64, 48)),
                                        np.float32) / 255).permute(2, 0, 1)[None]
    paint = torch.from_numpy(np.asarray(Image.fromarray(skimage_textures()["brick"]).resize((40, 56)),
                                        np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        f_c, f_s = model.encoder(photo), model.encoder(paint)
        t = torch.from_numpy(plain_adain(f_c[0].numpy(), f_s[0].numpy())).float()[None]
        for alpha in (1.0, 0.4):
            expected = model.decoder(alpha * t + (1 - alpha) * f_c).clamp(0, 1)
            got = model(photo, paint, alpha)
            assert got.shape == (1, 3, 48, 64)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(photo, paint, 1.0), model(photo, paint, 0.0), atol=1e-4)
    with pytest.raises(ValueError, match="alpha must be in 0..1"):
        model(photo, paint, 1.5)


def test_published_weights_are_looked_up_and_missing_ones_named(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("STYLORA_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsUnavailable, match="vgg_normalised.pth and decoder.pth missing"):
        A.AdaIN()
    enc, dec = _random_files(tmp_path / "weights")
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "weights"))
    model = A.AdaIN()
    for k, v in enc.items():
        if int(k.split(".")[0]) < A.RELU4_1:
            torch.testing.assert_close(model.encoder.state_dict()[k], v)
    for k, v in dec.items():
        torch.testing.assert_close(model.decoder.state_dict()[k], v)
    (tmp_path / "weights" / "decoder.pth").unlink()
    with pytest.raises(WeightsUnavailable, match="AdaIN unavailable: decoder.pth missing"):
        A.AdaIN()


def test_stylora_adain_stylises_one_photo(tmp_path, monkeypatch, capsys):
    from stylora.cli import main

    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "nothing"))
    photo, painting = tmp_path / "photo.jpg", tmp_path / "painting.png"
    Image.fromarray(skimage_photos()["astronaut"]).resize((100, 70)).save(photo)
    Image.fromarray(skimage_textures()["gravel"]).resize((90, 90)).save(painting)
    argv = ["adain", "--content", str(photo), "--style", str(painting), "--out", str(tmp_path / "out.png")]
    assert main(argv) == 1  # no weights: a runtime error naming both files
    assert "vgg_normalised.pth and decoder.pth missing" in capsys.readouterr().err
    _random_files(tmp_path / "weights")
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert main(argv + ["--alpha", "0.8"]) == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (96, 64)  # shrink-only, sides brought to multiples of 8
        info = json.loads(im.text["stylora"])  # the output describes itself
    assert info["alpha"] == 0.8 and info["weights"] == "vgg_normalised.pth, decoder.pth"
    assert info["style"] == "painting.png" and info["method"] == "adain"
    assert main(argv[:-1] + [str(tmp_path / "out.gif")]) == 2
    assert "must end in .png" in capsys.readouterr().err
