"""Published weights of the feature networks behind the metrics, found where users already have them.

Search order for a file: the host application's folders for them (inside ComfyUI its `models/stylora_metrics/`,
which the node pack registers and hands here with `use_host_folders`), $STYLORA_WEIGHTS_DIR, the torch hub cache
(`torch.hub.get_dir()/checkpoints`, where torchvision, lpips and pytorch-fid put them), then the packages that
vendor small ones (torchmetrics and lpips ship the LPIPS linear heads). Missing files are downloaded (into the
first of those folders) unless STYLORA_OFFLINE=1, at most once per process: a failed download is remembered, so
a ComfyUI server does not retry it on every run or node. Failing that, WeightsUnavailable's first line is short
("<file> missing; ...") and the next ones say where to get the file.
Only safetensors or `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """A metric's pretrained weights are not on this machine and could not be downloaded."""


_FAILED_DOWNLOADS: dict[str, str] = {}  # file name -> why its download failed, for the rest of the process


@dataclass(frozen=True)
class WeightsFile:
    name: str  # file name as published (and as torch hub caches it)
    url: str  # where it is published
    what: str  # what it is, for messages
    vendored: tuple[str, ...] = ()  # (package, relative path) pairs of packages that ship the file


TV = "https://download.pytorch.org/models/"
ALEXNET = WeightsFile("alexnet-owt-7be5be79.pth", TV + "alexnet-owt-7be5be79.pth", "torchvision AlexNet (ImageNet)")
VGG16 = WeightsFile("vgg16-397923af.pth", TV + "vgg16-397923af.pth", "torchvision VGG-16 (ImageNet)")
VGG19 = WeightsFile("vgg19-dcbb9e9d.pth", TV + "vgg19-dcbb9e9d.pth", "torchvision VGG-19 (ImageNet)")
FID_INCEPTION = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "FID Inception-v3 (TF 2015-12-05 weights, as pytorch-fid)")
_LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"
LPIPS_LINEAR = {
    net: WeightsFile(f"lpips_v0.1_{net}.pth", _LPIPS_URL + f"{net}.pth", f"LPIPS v0.1 linear heads ({net})",
                     vendored=(("torchmetrics", f"functional/image/lpips_models/{net}.pth"),
                               ("lpips", f"weights/v0.1/{net}.pth")))
    for net in ("alex", "vgg")
}


_host_folders: list[Callable[[], list[str]]] = []  # the host application's lookup of its folders for these files


def use_host_folders(folders: Callable[[], list[str]]) -> None:
    """Search the folders `folders()` returns (asked at each lookup) first: a host application's place for these
    files (the ComfyUI node pack passes its models/stylora_metrics lookup)."""
    _host_folders[:] = [folders]


def search_dirs() -> list[Path]:
    dirs = [Path(d) for folders in _host_folders for d in folders()]
    if os.environ.get("STYLORA_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["STYLORA_WEIGHTS_DIR"]))
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def _package_file(package: str, rel: str) -> Path | None:
    """A data file inside an installed package, found without importing it (lpips imports torchvision)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


def find_weights(spec: WeightsFile) -> Path | None:
    stem = Path(spec.name).stem
    for d in search_dirs():
        for name in (spec.name, stem + ".safetensors"):
            if (d / name).is_file():
                return d / name
    for package, rel in spec.vendored:
        if path := _package_file(package, rel):
            return path
    return None


def weights_path(spec: WeightsFile) -> Path:
    """Local path of `spec`, downloading it into the torch hub cache if allowed. Raises WeightsUnavailable."""
    path = find_weights(spec)
    if path is not None:
        return path
    dirs = search_dirs()
    target = dirs[0] / spec.name
    hint = (f"{spec.name} missing; see README, Style Metrics\n{spec.what}: not found in "
            f"{', '.join(str(d) for d in dirs)}. Download {spec.url} into {target.parent}.")
    if spec.name in _FAILED_DOWNLOADS:  # tried once in this process already: do not hit the network again
        raise WeightsUnavailable(_FAILED_DOWNLOADS[spec.name])
    if os.environ.get("STYLORA_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise WeightsUnavailable(hint)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s (%s) from %s into %s; once per run", spec.name, spec.what, spec.url,
                    target.parent)
        torch.hub.download_url_to_file(spec.url, str(target), progress=True)  # temp file + rename; tqdm progress
    except Exception as e:  # any network or disk failure: the caller reports the metric as unavailable
        _FAILED_DOWNLOADS[spec.name] = f"{hint} (download failed: {type(e).__name__}: {e})"
        logger.warning("could not download %s: %s: %s", spec.name, type(e).__name__, e)
        raise WeightsUnavailable(_FAILED_DOWNLOADS[spec.name]) from e
    logger.info("downloaded %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def load_state_dict(spec: WeightsFile) -> dict[str, torch.Tensor]:
    path = weights_path(spec)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs code to load is refused, as is a corrupt file
        raise WeightsUnavailable(f"{spec.what}: {path} could not be loaded safely ({e}); "
                                 f"replace it with the file from {spec.url}") from e
