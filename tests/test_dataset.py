"""The training images on small known pictures: bucket sizes worked out by hand, the crop and resize of a two-colour
image, captions, the skip report, the epoch's batches, and the latents (a stand-in VAE whose output is its input)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from stylora.trainer.dataset import (
    BatchOrder,
    StyleDataset,
    batch_latents,
    bucket_sizes,
    encode_latents,
    encode_prompt,
    epoch_batches,
    load_style_dataset,
    nearest_bucket,
)


def test_bucket_sizes_worked_out_by_hand():
    # resolution 6, step 1, aspect <= 2: w = 1..int(6 sqrt 2) = 8, h = 36 // w; kept where max(w/h, h/w) <= 2:
    # w 5 -> h 7, w 6 -> 6, w 7 -> 5, w 8 -> 4 (exactly 2:1); w 4 -> h 9 is 2.25:1, left out. Both orientations.
    assert bucket_sizes(6, step=1) == [(4, 8), (5, 7), (6, 6), (7, 5), (8, 4)]
    # resolution 192, step 64: w 128 -> h 36864 // 128 = 288 -> 256 (2:1); w 192 -> 192; w 256 -> 144 -> 128.
    assert bucket_sizes(192) == [(128, 256), (192, 192), (256, 128)]
    assert bucket_sizes(128) == [(128, 128)]  # w 64 -> h 256 is 4:1


def test_nearest_bucket_is_the_closest_aspect_in_log_space():
    sizes = [(4, 8), (6, 6), (8, 4)]  # (height, width): wide, square, tall
    assert nearest_bucket(300, 100, sizes) == (4, 8)  # 3:1 -> 2:1
    assert nearest_bucket(100, 300, sizes) == (8, 4)
    assert nearest_bucket(120, 100, sizes) == (6, 6)  # log 1.2 is nearer 0 than log 2
    assert nearest_bucket(150, 100, sizes) == (4, 8)  # |log 1.5 - log 2| = 0.288 < log 1.5 = 0.405


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2, 0] = 255
    arr[:, width // 2:, 2] = 255
    return Image.fromarray(arr)


def test_a_wide_image_goes_to_the_wide_bucket_resized_whole_left_stays_left(tmp_path):
    """A 2:1 image at resolution 192 fills the 128 x 256 bucket (scaled 1.28x, nothing cropped): red on the left,
    blue on the right, unmirrored; a square one goes to the square bucket; centre crops make every image square."""
    _halves(200, 100).save(tmp_path / "wide.png")
    Image.new("RGB", (150, 150), (0, 255, 0)).save(tmp_path / "square.png")
    ds = load_style_dataset(tmp_path, 192, crop="buckets", use_captions=False)
    assert ds.files == ["square.png", "wide.png"]
    wide = ds.pixels[1]
    assert wide.dtype == torch.uint8 and wide.shape == (3, 128, 256)
    assert ds.buckets == {(128, 256): [1], (192, 192): [0]}
    left, right = wide[:, :, :124].int(), wide[:, :, 132:].int()  # LANCZOS rings within 4 px of the edge
    assert (left[0] >= 250).all() and (left[2] <= 5).all() and (right[2] >= 250).all() and (right[0] <= 5).all()
    assert ds.pixels[0].shape == (3, 192, 192) and (ds.pixels[0][1] == 255).all()
    centre = load_style_dataset(tmp_path, 192, crop="center", use_captions=False)
    assert [tuple(p.shape) for p in centre.pixels] == [(3, 192, 192), (3, 192, 192)]


def test_captions_trigger_and_the_fingerprint(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  oil   painting,\n thick strokes \n")
    (tmp_path / "b.txt").write_text("")
    ds = load_style_dataset(tmp_path, 64, trigger=" sks ")
    assert ds.captions == ["sks, oil painting, thick strokes", "sks", "sks"]
    assert load_style_dataset(tmp_path, 64).captions == ["oil painting, thick strokes", "", ""]
    assert load_style_dataset(tmp_path, 64, trigger="sks", use_captions=False).captions == ["sks"] * 3
    assert len(ds.fingerprint) == 64 and ds.fingerprint == load_style_dataset(tmp_path, 64, trigger=" sks ").fingerprint
    assert ds.fingerprint != load_style_dataset(tmp_path, 64).fingerprint  # the captions are part of it


def test_min_images_is_met_by_exactly_that_many(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{name}.png")
    Image.new("RGB", (20, 64)).save(tmp_path / "small.png")
    ds = load_style_dataset(tmp_path, 64, min_images=2)
    assert len(ds) == 2 and [s.path for s in ds.skipped] == ["small.png"]
    assert "too small (20x64; shorter side must be >= 32)" in ds.skipped[0].reason
    with pytest.raises(ValueError, match=r"only 2 usable image\(s\), at least 3 needed \(1 skipped: small.png"):
        load_style_dataset(tmp_path, 64, min_images=3)


@pytest.mark.parametrize(("count", "tail"), [(10, "09.doc: not an image (extension))"),
                                             (11, "09.doc: not an image (extension) (and 1 more))")])
def test_the_skip_report_lists_ten_files_and_counts_the_rest(tmp_path, count, tail):
    for i in range(count):
        (tmp_path / f"{i:02d}.doc").write_text("")
    with pytest.raises(ValueError) as err:
        load_style_dataset(tmp_path, 64)
    message = str(err.value)
    assert f"only 0 usable image(s), at least 1 needed ({count} skipped: 00.doc: not an image" in message
    assert message.endswith(tail) and "10.doc" not in message


def _dataset(shapes: list[tuple[int, int]]) -> StyleDataset:
    pixels = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in shapes]
    return StyleDataset(None, [f"{i}.png" for i in range(len(shapes))], [""] * len(shapes), pixels)


def test_an_epoch_uses_every_image_once_in_batches_of_one_bucket():
    ds = _dataset([(64, 64)] * 5 + [(64, 128)] * 3)
    for epoch in (0, 1, 2):
        batches = epoch_batches(ds, 2, seed=4, epoch=epoch)
        assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 2]  # 5 -> 2 + 2 + 1, 3 -> 2 + 1
        assert sorted(i for b in batches for i in b) == list(range(8))
        assert all(len({tuple(ds.pixels[i].shape) for i in b}) == 1 for b in batches)
    assert epoch_batches(ds, 2, 4, 0) == epoch_batches(ds, 2, 4, 0)
    assert epoch_batches(ds, 2, 4, 0) != epoch_batches(ds, 2, 4, 1)


def test_batch_order_runs_epoch_after_epoch():
    ds = _dataset([(64, 64)] * 5)
    order = BatchOrder(ds, 2, seed=1)
    assert order.per_epoch == 3
    seen = [order[k] for k in range(7)]
    assert seen[:3] == epoch_batches(ds, 2, 1, 0) and seen[3:6] == epoch_batches(ds, 2, 1, 1)
    assert seen[6] == epoch_batches(ds, 2, 1, 2)[0]
    assert order[1] == seen[1]  # going back an epoch draws it again


class EchoVAE:
    """latent_dist.mean = the VAE's input, std = 1 + |input| / 2; remembers every input."""

    def __init__(self):
        self.inputs = []

    def encode(self, x):
        self.inputs.append(x.clone())
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x.clone(), std=1 + x.abs() / 2))


def _known_pixels() -> list[torch.Tensor]:
    return [torch.tensor([[[0, 51, 255], [102, 204, 153]]] * 3, dtype=torch.uint8) + torch.arange(3).view(3, 1, 1),
            torch.full((3, 2, 3), 127, dtype=torch.uint8)]


def test_encode_latents_scales_pixels_to_minus_one_one_and_mirrors_the_second_set(capsys):
    ds = StyleDataset(None, ["a", "b"], ["", ""], _known_pixels())
    vae = EchoVAE()
    plain, mirrored = encode_latents(vae, ds, flip=True, device=torch.device("cpu"), show=True)
    for i, px in enumerate(ds.pixels):
        x = px.float() / 127.5 - 1  # 0 -> -1, 255 -> 1
        torch.testing.assert_close(plain[0][i], x)
        torch.testing.assert_close(plain[1][i], 1 + x.abs() / 2)
        torch.testing.assert_close(mirrored[0][i], x.flip(-1))
        torch.testing.assert_close(mirrored[1][i], 1 + x.flip(-1).abs() / 2)
    assert plain[0][0][0, 0].tolist() == pytest.approx([-1.0, 51 / 127.5 - 1, 1.0])
    assert [tuple(x.shape) for x in vae.inputs] == [(1, 3, 2, 3)] * 4
    err = capsys.readouterr().err
    assert err.index("Encoding latents:") < err.index("Encoding latents (mirrored):")
    only = encode_latents(EchoVAE(), ds, flip=False, device=torch.device("cpu"), show=False)
    assert len(only) == 1
    torch.testing.assert_close(only[0][0][1], ds.pixels[1].float() / 127.5 - 1)


def _seed_where(first_draw_below_half: bool) -> int:
    return next(s for s in range(100) if (torch.rand((), generator=torch.Generator().manual_seed(s)) < 0.5)
                == first_draw_below_half)


def test_batch_latents_from_the_cache_sample_the_posterior_of_each_images_chosen_copy():
    ds = StyleDataset(None, ["a", "b", "c"], [""] * 3, [torch.zeros(3, 2, 2, dtype=torch.uint8)] * 3)
    means = [torch.full((1, 2, 2), float(i)) for i in range(3)]
    cache = [(means, [torch.full((1, 2, 2), 0.5)] * 3),
             ([m + 10 for m in means], [torch.full((1, 2, 2), 2.0)] * 3)]
    ids = [2, 0, 1, 2]
    latents, mirrored = batch_latents(ids, ds, cache, None, True, torch.Generator().manual_seed(5), None)
    g = torch.Generator().manual_seed(5)  # the same draws: which copy, then the noise
    flips = torch.randint(0, 2, (4,), generator=g).tolist()
    noise = torch.randn(4, 1, 2, 2, generator=g)
    assert mirrored == [bool(f) for f in flips] and 0 < sum(flips) < 4
    for k, (i, f) in enumerate(zip(ids, flips)):
        mean, std = (i + 10.0, 2.0) if f else (float(i), 0.5)
        torch.testing.assert_close(latents[k], mean + std * noise[k])
    latents, mirrored = batch_latents(ids, ds, cache, None, False, torch.Generator().manual_seed(5), None)
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    assert mirrored == [False] * 4
    torch.testing.assert_close(latents, torch.tensor(ids, dtype=torch.float32).view(4, 1, 1, 1) + 0.5 * noise)


@pytest.mark.parametrize("mirror", [True, False])
def test_uncached_batch_latents_encode_the_scaled_pixels_mirrored_together(mirror):
    ds = StyleDataset(None, ["a", "b"], ["", ""], _known_pixels())
    seed = _seed_where(mirror)
    vae = EchoVAE()
    latents, mirrored = batch_latents([1, 0], ds, None, vae, True, torch.Generator().manual_seed(seed),
                                      torch.device("cpu"))
    assert mirrored == [mirror, mirror]
    x = torch.stack([ds.pixels[1], ds.pixels[0]]).float() / 127.5 - 1
    x = x.flip(-1) if mirror else x  # left-right only
    torch.testing.assert_close(vae.inputs[0], x)
    g = torch.Generator().manual_seed(seed)
    torch.rand((), generator=g)  # the mirror draw comes first
    torch.testing.assert_close(latents, x + (1 + x.abs() / 2) * torch.randn(x.shape, generator=g))
    _, never = batch_latents([0], ds, None, EchoVAE(), False, torch.Generator().manual_seed(seed), None)
    assert never == [False]


def test_encode_prompt_pads_and_truncates_to_77_tokens_and_returns_the_last_hidden_state():
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_SD15_CONFIG / "tokenizer")
    seen = []

    def text_encoder(ids):  # (last hidden state [1, 77, 2], pooled [1, 2]): the ids themselves, twice
        seen.append(ids)
        hidden = torch.stack([ids, -ids], dim=-1).double()
        return hidden, hidden[:, 0]

    out = encode_prompt(tokenizer, text_encoder, " ".join(["paint"] * 100), torch.device("cpu"))
    assert seen[0].shape == (1, 77) and out.shape == (77, 2) and out.dtype == torch.float32
    assert out[0, 0] == tokenizer.bos_token_id and out[76, 0] == tokenizer.eos_token_id  # cut, then closed
    torch.testing.assert_close(out[:, 1], -seen[0][0].float())
    empty = encode_prompt(tokenizer, text_encoder, "", torch.device("cpu"))
    assert empty.shape == (77, 2) and empty[1, 0] == tokenizer.eos_token_id
