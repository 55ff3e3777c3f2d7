"""A folder of style images: scanned, validated, captioned, cropped to training size and batched."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.files import Skipped, scan_folder
from ..core.images import ImageLoadError, load_image, resize_cover
from .seeds import stream

logger = logging.getLogger(__name__)


@dataclass
class StyleDataset:
    """Usable training images, each cropped to its bucket size, with its caption.

    pixels[i]: uint8 tensor [3, H, W]; H, W multiples of 64 (all equal to `resolution` with center crops).
    """

    root: Path
    files: list[str]  # relative paths of the usable images, sorted
    captions: list[str]  # one per file; trigger + caption text, "" for promptless
    pixels: list[torch.Tensor]
    skipped: list[Skipped] = field(default_factory=list)
    fingerprint: str = ""  # sha256 over the used files' names and bytes: same folder, same fingerprint

    def __len__(self) -> int:
        return len(self.files)

    @property
    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """(height, width) -> indices of the images of that size."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(self.pixels):
            out.setdefault((int(p.shape[1]), int(p.shape[2])), []).append(i)
        return dict(sorted(out.items()))


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, with area <= resolution**2 and aspect <= max_aspect."""
    area = resolution * resolution
    sizes = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + 1, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            sizes.add((h, w))
            sizes.add((w, h))
    sizes.add((resolution, resolution))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space to width/height."""
    target = math.log(width / height)
    return min(sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))


def load_style_dataset(
    data: str | Path,
    resolution: int,
    crop: str = "center",
    trigger: str = "",
    use_captions: bool = True,
    min_images: int = 1,
    max_image_pixels: int = 100_000_000,
    min_side: int | None = None,
    progress: bool = False,
) -> StyleDataset:
    """Scan `data`, load every usable image, crop it to its training size and attach its caption.

    Images whose shorter side is under `min_side` (default resolution // 2: more than 2x upscaling
    smears brush strokes) are skipped as too small. Raises FileNotFoundError for a missing folder and
    ValueError when fewer than `min_images` images are usable, listing why the others were skipped.
    """
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: {root} is not a folder of images")
    min_side = resolution // 2 if min_side is None else min_side
    sizes = bucket_sizes(resolution) if crop == "buckets" else [(resolution, resolution)]

    candidates, skipped = scan_folder(root)
    files, captions, pixels = [], [], []
    digest = hashlib.sha256()
    for path in tqdm(candidates, desc="Scanning images", unit="img", disable=not progress):
        rel = path.relative_to(root).as_posix()
        try:
            img = load_image(path, max_pixels=max_image_pixels)
        except ImageLoadError as e:
            skipped.append(Skipped(rel, e.reason))
            continue
        if min(img.size) < min_side:
            skipped.append(Skipped(rel, f"too small ({img.size[0]}x{img.size[1]}; shorter side must be >= {min_side})"))
            continue
        h, w = nearest_bucket(img.size[0], img.size[1], sizes)
        arr = np.asarray(resize_cover(img, w, h), dtype=np.uint8)
        caption = _read_caption(path) if use_captions else ""
        text = ", ".join(t for t in (trigger.strip(), caption) if t)
        files.append(rel)
        captions.append(text)
        pixels.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0" + text.encode() + b"\0")

    for s in skipped:
        logger.warning("skipped %s: %s", s.path, s.reason)
    if len(files) < min_images:
        detail = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        raise ValueError(
            f"--data {root}: only {len(files)} usable image(s), at least {min_images} needed "
            f"({len(skipped)} skipped{': ' + detail + more if skipped else ''})"
        )
    return StyleDataset(root, files, captions, pixels, skipped, digest.hexdigest())


def _read_caption(image_path: Path) -> str:
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return ""
    try:
        return " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
    except OSError as e:
        logger.warning("%s: caption unreadable (%s); training it without one", txt, e)
        return ""


def epoch_batches(dataset: StyleDataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: each bucket shuffled and chunked, then the batch order shuffled.

    Deterministic in (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    Every epoch has the same number of batches.
    """
    g = stream(seed, epoch)
    batches = []
    for indices in dataset.buckets.values():
        perm = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
        batches += [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class BatchOrder:
    """The endless sequence of batches, epoch after epoch: `order[k]` is the k-th batch of every run with this
    seed, so a resumed run picks up exactly where the interrupted one was. Keeps the current epoch's order."""

    def __init__(self, dataset: StyleDataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.per_epoch = len(epoch_batches(dataset, batch_size, seed, 0))
        self._epoch, self._batches = -1, []

    def __getitem__(self, index: int) -> list[int]:
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.dataset, self.batch_size, self.seed, epoch)
        return self._batches[i]


def encode_prompt(tokenizer, text_encoder, prompt: str, device: torch.device) -> torch.Tensor:
    """CLIP last hidden state [77, D] of `prompt` ("" for the unconditional/promptless embedding)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0][0].float().cpu()


def encode_latents(vae, dataset: StyleDataset, flip: bool, device: torch.device, show: bool
                    ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """VAE posterior (mean, std) per image, [4, H/8, W/8] each; index 1 holds the mirrored images."""
    out = []
    for mirrored in ([False, True] if flip else [False]):
        means, stds = [], []
        for px in tqdm(dataset.pixels, desc="Encoding latents" + (" (mirrored)" if mirrored else ""),
                       unit="img", disable=not show):
            x = px.flip(-1) if mirrored else px
            with torch.no_grad():
                dist = vae.encode(x[None].to(device, torch.float32) / 127.5 - 1).latent_dist
            means.append(dist.mean[0].cpu())
            stds.append(dist.std[0].cpu())
        out.append((means, stds))
    return out


def batch_latents(ids: list[int], dataset: StyleDataset, cache, vae, flip: bool, g: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, list[bool]]:
    """Unscaled latents [B, 4, H/8, W/8] sampled from the VAE posterior of images `ids`, mirrored at random
    when `flip`; also returns which images were mirrored."""
    if cache is not None:
        mirrored = (torch.randint(0, 2, (len(ids),), generator=g) if flip else torch.zeros(len(ids))).bool().tolist()
        mean = torch.stack([cache[int(m)][0][i] for i, m in zip(ids, mirrored)])
        std = torch.stack([cache[int(m)][1][i] for i, m in zip(ids, mirrored)])
        return mean + std * torch.randn(mean.shape, generator=g), mirrored
    pixels = torch.stack([dataset.pixels[i] for i in ids])
    mirror = bool(flip and torch.rand((), generator=g) < 0.5)
    if mirror:
        pixels = pixels.flip(-1)
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, torch.float32) / 127.5 - 1).latent_dist
    return dist.mean.cpu() + dist.std.cpu() * torch.randn(dist.mean.shape, generator=g), [mirror] * len(ids)
