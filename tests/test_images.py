"""Untrusted image files: each converted as a person would expect, or refused with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from stylora.core.images import ImageLoadError, load_image, resize_cover
from stylora.trainer.dataset import bucket_sizes, epoch_batches, load_style_dataset, nearest_bucket


def test_cmyk_becomes_rgb(tmp_path):
    path = tmp_path / "red.tif"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = np.asarray(img)[0, 0]
    assert r > 200 and g < 60 and b < 60


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[:, :5] = (255, 0, 0, 255)  # opaque red left half, fully transparent right half
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 9]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert tuple(np.asarray(load_image(tmp_path / "p.png"))[0, 0]) == (255, 255, 255)


def test_16bit_greyscale_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (4, 3, 3)
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 60)


def test_truncated_jpeg_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated|corrupt"):
        load_image(tmp_path / "cut.jpg")


def test_not_an_image_and_bomb_refused(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "fake.png")
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load_image(tmp_path / "big.png", max_pixels=300 * 299)


def test_resize_cover_keeps_centre():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (75, 0, 125, 100))  # white centre band
    out = resize_cover(img, 64, 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[32, 32].min() > 200


def test_buckets_are_multiples_of_64_within_area():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 for h, w in sizes)
    h, w = nearest_bucket(1600, 900, sizes)  # landscape 16:9
    assert w > h


def test_dataset_reports_every_skipped_file(tmp_path, style_folder):
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (1, 2, 3)).save(buf, "JPEG")
    (style_folder / "cut.jpg").write_bytes(buf.getvalue()[:200])
    Image.new("CMYK", (96, 96), (0, 200, 200, 0)).save(style_folder / "cmyk.tif")
    Image.new("RGB", (10, 10)).save(style_folder / "tiny.png")
    (style_folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (style_folder / "brick.txt").write_text("red bricks")
    ds = load_style_dataset(style_folder, resolution=64, trigger="sks style", min_images=1)
    reasons = {s.path: s.reason for s in ds.skipped}
    assert set(reasons) == {"cut.jpg", "tiny.png", "notes.pdf"}
    assert "too small" in reasons["tiny.png"] and "not an image" in reasons["notes.pdf"]
    assert "cmyk.tif" in ds.files
    assert ds.captions[ds.files.index("brick.png")] == "sks style, red bricks"
    assert all(p.shape == (3, 64, 64) and p.dtype.is_floating_point is False for p in ds.pixels)
    again = load_style_dataset(style_folder, resolution=64, trigger="sks style", min_images=1)
    assert again.fingerprint == ds.fingerprint


def test_all_broken_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"only 0 usable image\(s\), at least 5 needed \(2 skipped"):
        load_style_dataset(tmp_path, resolution=64, min_images=5)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_style_dataset(tmp_path / "missing", resolution=64)


def test_epoch_batches_deterministic_and_cover_everything(style_folder):
    ds = load_style_dataset(style_folder, resolution=64, min_images=1)
    a = epoch_batches(ds, 4, seed=3, epoch=2)
    assert a == epoch_batches(ds, 4, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(len(ds)))
    assert a != epoch_batches(ds, 4, seed=3, epoch=3) or len(ds) < 3


def test_batch_order_continues_across_epochs(style_folder):
    from stylora.trainer.dataset import BatchOrder

    ds = load_style_dataset(style_folder, resolution=64, min_images=1)
    order = BatchOrder(ds, 4, seed=5)
    assert order.per_epoch == 2  # six images: 4 + 2
    assert [order[k] for k in (0, 1, 2, 3)] == epoch_batches(ds, 4, 5, 0) + epoch_batches(ds, 4, 5, 1)
    assert BatchOrder(ds, 4, seed=5)[3] == order[3]  # a fresh (resumed) sequence agrees
