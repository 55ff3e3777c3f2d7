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


def test_refusals_name_the_file_or_bytes_or_the_given_name(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError) as e:
        load_image(bad)
    assert str(e.value) == f"{bad}: not an image (unrecognised format)" and e.value.path == str(bad)
    with pytest.raises(ImageLoadError) as e:
        load_image(b"not an image at all")
    assert e.value.path == "<bytes>"
    with pytest.raises(ImageLoadError) as e:
        load_image(b"not an image at all", name="row 7")
    assert e.value.path == "row 7"


def test_pixel_limit_is_inclusive(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", max_pixels=100).size == (10, 10)
    with pytest.raises(ImageLoadError, match="10x10 is over the 99-pixel limit"):
        load_image(tmp_path / "a.png", max_pixels=99)


def test_32bit_greyscale_up_to_255_is_kept_as_8bit(tmp_path):
    arr = np.array([[0, 1, 128, 255]], dtype=np.int32)
    Image.fromarray(arr, mode="I").save(tmp_path / "i.tif")
    assert np.asarray(load_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_resize_cover_crops_the_exact_centre_for_an_odd_overhang():
    """83x40 into 40x40: scale 1, 43 columns too many: columns 21..60 are kept (21 left, 22 right)."""
    cols = np.tile(np.arange(83, dtype=np.uint8) * 3, (40, 1))
    out = np.asarray(resize_cover(Image.fromarray(np.stack([cols] * 3, -1)), 40, 40))
    assert out.shape == (40, 40, 3) and out[0, 0, 0] == 21 * 3 and out[0, -1, 0] == 60 * 3


def test_to_8bit_scales_by_the_type_range():
    from stylora.core.images import _to_8bit

    u8 = np.array([[0, 7, 255]], np.uint8)
    assert _to_8bit(u8) is u8
    assert _to_8bit(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)).tolist() == [[0, 128, 255, 0]]
    assert _to_8bit(np.array([[0.0, 1.5, 255.0]], np.float32)).tolist() == [[0, 2, 255]]  # > 1: a 0..255 range
    assert _to_8bit(np.array([[0, 128, 129, 257, 65535]], np.uint16)).tolist() == [[0, 0, 1, 1, 255]]
    assert _to_8bit(np.array([[0, 256, 65535]], np.int32)).tolist() == [[0, 1, 255]]


def test_decompression_bomb_header_refused_before_decoding(tmp_path):
    """A PNG whose header claims 30000x30000 pixels: Pillow refuses it at open (over twice its pixel limit)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n"
    for kind, body in ((b"IHDR", ihdr), (b"IDAT", zlib.compress(b"")), (b"IEND", b"")):
        data += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "bomb.png", max_pixels=10**12)
    assert e.value.reason.startswith("refused: decompression bomb")


def test_rgba_with_an_icc_profile_keeps_its_transparency(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    img.save(tmp_path / "icc.png", icc_profile=srgb)
    px = np.asarray(load_image(tmp_path / "icc.png"))
    assert px[0, 0].tolist() == [255, 255, 255] and abs(int(px[0, 1, 0]) - 127) <= 1  # on white: 255 * (1 - 128/255)


def test_half_transparent_pixels_are_mixed_with_white(tmp_path):
    img = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    img.save(tmp_path / "half.png")
    assert abs(int(np.asarray(load_image(tmp_path / "half.png"))[0, 0, 0]) - 127) <= 1


def test_resize_cover_scales_down_before_cropping():
    """200x100 into 40x40: scale 0.4 -> 80x40, then columns 20..59 of that, i.e. source columns ~50..149."""
    cols = np.tile(np.arange(200) * 255 // 199, (100, 1)).astype(np.uint8)
    out = np.asarray(resize_cover(Image.fromarray(np.stack([cols] * 3, -1)), 40, 40)).astype(int)
    assert out.shape == (40, 40, 3)
    assert abs(out[20, 0, 0] - 50 * 255 // 199) <= 3 and abs(out[20, -1, 0] - 149 * 255 // 199) <= 3


def test_image_grid_places_cells_titles_and_notes(tmp_path):
    """Two rows of 10 px cells with row titles (a 16 px band each) and no column titles; then one row with column
    titles (a 20 px band on top): each cell's pixels, worked out from the layout."""
    from stylora.core.images import image_grid

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (30, 20), (255, 0, 0)).save(red)
    Image.new("RGB", (5, 5), (0, 0, 255)).save(blue)
    (tmp_path / "broken.png").write_bytes(b"no image")
    grid = image_grid([[red, blue], [None, tmp_path / "broken.png"]], 10, 3, row_titles=("one", "two"),
                      missing="x", unreadable=None)
    assert grid.size == (30, 2 * (10 + 16)) and grid.mode == "RGB"
    assert grid.getpixel((5, 16 + 5)) == (255, 0, 0) and grid.getpixel((15, 16 + 5)) == (0, 0, 255)
    assert grid.getpixel((25, 16 + 5)) == (255, 255, 255)  # a third column with no file
    assert grid.getpixel((15, 26 + 16 + 5)) == (255, 255, 255)  # unreadable, no note asked for
    grid = image_grid([[red, None, tmp_path / "broken.png"]], 40, 3, column_titles=("a", "b", "c"), missing="not run")
    assert grid.size == (120, 20 + 40) and grid.getpixel((20, 20 + 30)) == (255, 0, 0)
    assert grid.getpixel((20, 19)) == (255, 255, 255) and grid.getpixel((20, 20)) == (255, 0, 0)
    notes = [[grid.getpixel((c * 40 + x, 20 + y)) for x in range(4, 36) for y in range(4, 14)] for c in (1, 2)]
    assert all(any(p != (255, 255, 255) for p in cell) for cell in notes)  # "not run" and "unreadable"
    assert all(p[0] >= p[1] and p[0] >= p[2] for cell in notes for p in cell)  # in red
