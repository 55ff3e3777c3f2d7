"""Loading untrusted image files into plain 8-bit RGB, or a reason why not.

Paintings scraped from the web come as CMYK JPEGs, 16-bit TIFFs, palette PNGs with transparency,
phone photos with EXIF rotation and the occasional truncated download. Each is converted the way a
person looking at it would expect, or refused with a one-line reason.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Extensions we try to open. Anything else in a data folder is reported as "not an image",
# except these sidecar files, which are ours or the user's notes.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif"}
SIDECAR_EXTENSIONS = {".txt", ".json", ".csv", ".md", ".toml", ".yaml", ".yml"}


class ImageLoadError(ValueError):
    """An image file that cannot be used; `reason` is a short phrase for per-file reports."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth greyscale array to uint8 by its type's range (16-bit: /257)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        top = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # 16-bit data may arrive as uint16 or int32 (Pillow mode "I"); values above 255 mean a 16-bit range.
    top = 65535.0 if arr.max(initial=0) > 255 or arr.dtype == np.uint16 else 255.0
    return np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: ICC profiles to sRGB, alpha composited on white."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("CMYK", "RGB", "RGBA"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
            img = ImageCms.profileToProfile(img, src, dst, outputMode=out_mode)
        except (ImageCms.PyCMSError, OSError) as e:  # a broken profile: fall back to the plain conversion
            logger.debug("ignoring unusable ICC profile: %s", e)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = Image.fromarray(_to_8bit(np.asarray(img)), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_checked(path: str | Path | bytes, max_pixels: int, name: str | None) -> tuple[Image.Image, str | Path]:
    """The image's first frame, decoded, in its own mode, and the name errors give it. The caller closes the image.
    Raises ImageLoadError for non-images, corrupt data and images over `max_pixels` (refused before decoding)."""
    source = io.BytesIO(path) if isinstance(path, bytes) else Path(path)
    path = name or ("<bytes>" if isinstance(path, bytes) else source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"refused: decompression bomb ({e})") from None
    except OSError as e:
        raise ImageLoadError(path, f"cannot be read ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageLoadError(path, f"refused: {w}x{h} is over the {max_pixels:,}-pixel limit (decompression bomb?)")
    try:
        img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        img.close()
        reason = "truncated or corrupt" if "truncat" in str(e).lower() or isinstance(e, OSError) else "corrupt"
        raise ImageLoadError(path, f"{reason} ({e})") from None
    return img, path


def _upright(img: Image.Image, path: str | Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, KeyError) as e:  # broken EXIF: keep the pixels as stored
        logger.debug("%s: ignoring unreadable EXIF orientation: %s", path, e)
        return img


def load_image(path: str | Path | bytes, max_pixels: int = 100_000_000, name: str | None = None) -> Image.Image:
    """Open `path` (a file, or the encoded bytes of one, e.g. from a parquet column) as an upright 8-bit RGB image.

    Raises ImageLoadError with a reason for: files that are not images, truncated or corrupt data,
    images over `max_pixels` (width*height; refused before decoding, so a decompression bomb costs
    nothing) and pixel formats that cannot be converted.
    """
    img, path = _open_checked(path, max_pixels, name)
    with img:
        upright = _upright(img, path)
        try:
            return to_rgb(upright)
        except (OSError, ValueError) as e:
            raise ImageLoadError(path, f"unsupported pixel format {upright.mode!r} ({e})") from None


def load_mask(path: str | Path, max_pixels: int = 100_000_000) -> Image.Image:
    """Open a mask file as an upright 8-bit "L" image, 255 = masked, with load_image's checks.

    An image with transparency (some alpha below 255: ComfyUI's mask editor saves a painted mask as alpha 0) gives
    255 - alpha, the convention of ComfyUI's Load Image (MASK = 1 - alpha). Any other image gives its brightness,
    white = masked; 16-bit and float greys are scaled by their type's range (16-bit 32768 -> 128), not clipped.
    """
    img, name = _open_checked(path, max_pixels, None)
    with img:
        upright = _upright(img, name)
        try:
            if upright.mode == "P" and "transparency" in upright.info:
                upright = upright.convert("RGBA")
            if "A" in upright.getbands() and upright.getchannel("A").getextrema()[0] < 255:
                return ImageOps.invert(upright.getchannel("A").convert("L"))
            if upright.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                return Image.fromarray(_to_8bit(np.asarray(upright)), mode="L")
            return upright.convert("L")
        except (OSError, ValueError) as e:
            raise ImageLoadError(name, f"unsupported pixel format {upright.mode!r} for a mask ({e})") from None


def resize_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height (aspect kept), then crop the centre. LANCZOS resampling."""
    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def image_grid(rows: list[list[str | Path | None]], cell: int, columns: int, *, column_titles: tuple[str, ...] = (),
               row_titles: tuple[str, ...] = (), missing: str | None = None,
               unreadable: str | None = "unreadable") -> Image.Image:
    """A white RGB sheet of `cell` x `cell` thumbnails (each image scaled to cover its cell, centre-cropped), one
    list of files per row, `columns` cells wide.

    With `column_titles`, a 20 px band on top holds them; with `row_titles`, each row starts with a 16 px band
    holding its title. A cell whose file is None or not on disk shows `missing` in red (None: stays white); an
    unreadable file shows `unreadable` in red (None: stays white).
    """
    top = 20 if column_titles else 0
    band = 16 if row_titles else 0
    canvas = Image.new("RGB", (columns * cell, top + len(rows) * (cell + band)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        draw.text((c * cell + 4, 4), title, fill="black")
    for r, files in enumerate(rows):
        y = top + r * (cell + band)
        if row_titles:
            draw.text((4, y + 2), row_titles[r], fill="black")
        for c, f in enumerate(files):
            x, note = c * cell, None
            if f is None or not Path(f).is_file():
                note = missing
            else:
                try:
                    canvas.paste(resize_cover(load_image(f), cell, cell), (x, y + band))
                except ImageLoadError:
                    note = unreadable
            if note:
                draw.text((x + 4, y + band + 4), note, fill="red")
    return canvas
