"""The pack on a GPU ComfyUI, as users run it: checks that CPU runs cannot reach, and what each workflow costs.

    source /tmp/comfy_env.sh          # COMFYUI_DIR, COMFYUI_PYTHON, COMFYUI_PYTHONPATH (a ComfyUI with CUDA torch)
    python benchmarks/gpu_check.py    # on the GPU machine: 512 px, 20 steps, timings and peak VRAM
    python benchmarks/gpu_check.py --dry   # anywhere (CI): the same checks on the CPU at 64 px, 2 steps, no timings

On CUDA with torch >= 2.8, ComfyUI's default model patcher applies LoRA patches per layer at run time (the
dynamic-VRAM patcher) and falls back to the classic one on the CPU, so only a GPU run checks Style Strength's
rescaled patches and Content Encode's float32 VAE copy there. Everything the check needs is made here (no network):
a random-weight full-size SD1.5 checkpoint (or --checkpoint / COMFYUI_SD15_CKPT), three styles trained or drawn
from it, the bundled example photo and mask. Checks:

1. strength 0 == plain img2img (the same graph without the style nodes), bit for bit, through the server;
2. three styles blended: each patched weight carries strength x normalised weight (in ComfyUI's process);
3. the masked composite: every pixel outside the mask is the photo's, exactly;
4. Content Encode's float32 retry: a float32 VAE copy built from the loaded VAE encodes like the original;
5. every bundled workflow end to end, printing seconds per image and peak VRAM (sampled from /system_stats).
Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the real-host tests' helpers: server start-up, styles, in-process checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, 64 px, 2 steps, no timings (CI keeps it working)")
    parser.add_argument("--checkpoint", default=os.environ.get("COMFYUI_SD15_CKPT", ""),
                        help="an SD1.5 .safetensors (default: a random-weight one built here, about 2 GB)")
    parser.add_argument("--work", default="", help="working folder (default: a temporary one)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (--dry: 64)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (--dry: 2)")
    args = parser.parse_args()
    import tempfile

    size, steps = (64, 2) if args.dry else (args.size, args.steps)
    with tempfile.TemporaryDirectory(prefix="stylora-gpu-check-") as tmp:  # removed after (a 2 GB checkpoint)
        check_all(args, Path(args.work or tmp), size, steps)
    say("all checks passed")


def check_all(args: argparse.Namespace, work: Path, size: int, steps: int) -> None:
    from conftest import comfyui_process

    # 1. The checkpoint, the ComfyUI base folder and three styles.
    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(work / "random-sd15.safetensors")
    base = make_base(work / "comfy", ckpt)
    say(f"checkpoint {ckpt}; ComfyUI base {base}; {size} px, {steps} steps, {'CPU (dry)' if args.dry else 'GPU'}")
    # 2. In ComfyUI's own process on the chosen device: blend strengths and the float32 VAE copy.
    env = {"COMFYUI_ARGS": "--cpu" if args.dry else ""}
    style_report = in_comfyui("comfyui_check_style_node.py", env, str(REPO), str(ckpt), str(base / "models" / "styles"),
                              "mystyle.safetensors", "strong.safetensors", "third.safetensors")
    check("3-style blend: every patched weight at strength x weight", style_report["blend3_keys"] == 128
          and style_report["blend3_strengths"] == [[0.1, 0.3, 0.4]], style_report["blend3_strengths"])
    check("Style Strength 0 bakes the base weights exactly, 0.5 does not", style_report["strength0_max_diff"] == 0
          and style_report["strength05_max_diff"] > 0, (style_report["strength0_max_diff"],
                                                         style_report["strength05_max_diff"]))
    encode_report = in_comfyui("comfyui_check_encode.py", env, str(REPO), str(ckpt))
    check("Content Encode float32 retry: a float32 copy, same latents", encode_report["fp32_dtype"] == "torch.float32"
          and encode_report["fp32_vs_plain"] < 1e-2, encode_report)
    # 3. Through a server on the device, with its default model patcher.
    photo, mask = inputs(work, size)
    with comfyui_process(base, cpu=args.dry) as url:
        say(f"server {url}: {json.loads(get(url, '/system_stats'))['devices'][0]['name']}")
        check_strength_zero(url, work, photo, steps)
        check_masked_composite(url, work, photo, mask, steps)
        table = run_every_workflow(url, work, photo, mask, steps, timed=not args.dry)
    # 4. The table.
    if not args.dry:
        say(f"{'workflow':18} {'s/image':>8} {'peak VRAM (GiB)':>16}   ({size} px, {steps} steps)")
        for name, (seconds, vram) in table.items():
            say(f"{name:18} {seconds:8.1f} {vram:16.2f}")


def say(text: str) -> None:
    print(text, flush=True)


def check(what: str, ok: bool, detail: object) -> None:
    say(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    if not ok:
        sys.exit(1)


def build_checkpoint(path: Path) -> Path:
    from model_builders import build_random_pipeline, save_single_file
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    if not path.is_file():
        save_single_file(build_random_pipeline(SHIPPED_SD15_CONFIG, seed=0, samplable=True), path)
    return path


def make_base(base: Path, ckpt: Path) -> Path:
    """ComfyUI's base folder: the pack linked in, the checkpoint, a trained style and two drawn from its modules."""
    import torch
    from conftest import make_style_folder
    from safetensors.torch import save_file
    from stylora.core.lora_file import read_lora
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    styles = base / "models" / "styles"
    for sub in ("custom_nodes", "models/checkpoints", "models/styles", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for link, target in ((base / "custom_nodes" / "stylora", REPO),
                         (base / "models" / "checkpoints" / "sd15.safetensors", ckpt)):
        if not link.exists():
            link.symlink_to(target)
    # layout_guard's ControlNet (random weights, the UNet's architecture) and train_style's paintings
    from conftest import CONTROLNET_NAME, build_random_controlnet

    (base / "models" / "controlnet").mkdir(parents=True, exist_ok=True)
    if not (base / "models" / "controlnet" / CONTROLNET_NAME).is_file():
        build_random_controlnet(base / "models" / "controlnet" / CONTROLNET_NAME)
    if not (base / "input" / "paintings").is_dir():
        make_style_folder(base / "input" / "paintings")
    if not (styles / "mystyle.safetensors").is_file():
        folder = base / "paintings"
        if not folder.is_dir():
            make_style_folder(folder)
        train_lora(LoraTrainConfig(data=str(folder), output=str(styles / "mystyle.safetensors"), base_model=str(ckpt),
                                   resolution=64, steps=1, batch_size=1, min_images=1, checkpoint_every=0),
                   progress=False)
    state, meta = read_lora(styles / "mystyle.safetensors")
    for name, seed, scale in (("strong.safetensors", 0, 0.2), ("third.safetensors", 2, 0.05)):
        gen = torch.Generator().manual_seed(seed)
        save_file({k: v if k.endswith(".alpha") else (torch.randn(v.shape, generator=gen) * scale).to(v.dtype)
                   for k, v in state.items()}, str(styles / name), metadata=meta)
    return base


def in_comfyui(script: str, env: dict[str, str], *args: str) -> dict:
    """One of the real-host tests' in-process checks, under ComfyUI's python; its JSON report."""
    from comfyui_env import comfyui_pythonpath

    comfy = os.environ["COMFYUI_DIR"]
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = comfyui_pythonpath(comfy)
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(REPO / "tests" / script), *args],
                          cwd=comfy, env=full, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        check(f"{script} ran", False, proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def inputs(work: Path, size: int) -> tuple[Path, Path]:
    """The bundled example photo and mask at size x size (white = styled)."""
    from PIL import Image

    photo, mask = work / "content.png", work / "mask.png"
    Image.open(REPO / "examples" / "stylora_content.jpg").resize((size, size), Image.Resampling.LANCZOS).save(photo)
    Image.open(REPO / "examples" / "stylora_mask.png").resize((size, size), Image.Resampling.NEAREST).save(mask)
    return photo, mask


def get(url: str, path: str) -> bytes:
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return resp.read()


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def run(url: str, out: Path, workflow: str, photo: Path, steps: int, *overrides: str, **kw) -> Path:
    from stylora.workflows.client import RunConfig, run_workflow

    ckpt = {} if workflow == "dreambooth" else {"checkpoint": "sd15.safetensors"}
    result = run_workflow(RunConfig(content=str(photo), out=str(out), server=(url,), workflow=workflow, seed=3,
                                    set=(f"Sampler.steps={steps}", *overrides), overwrite=True, **ckpt, **kw),
                          poll=0.2)
    if result.failed or not out.is_file():
        check(f"{workflow} ran", False, result.failed)
    return out


def check_strength_zero(url: str, work: Path, photo: Path, steps: int) -> None:
    """Style Strength 0 with a strong style gives plain img2img's pixels at the same denoise."""
    from stylora.workflows.client import load_workflow

    plain = load_workflow("style_transfer")  # the same graph without Load Style LoRA and Style Strength
    del plain["2"], plain["3"]
    plain["4"]["inputs"]["clip"] = plain["5"]["inputs"]["clip"] = ["1", 1]
    plain["4"]["inputs"]["text"] = ""  # what the promptless style's trigger output gives
    plain["8"]["inputs"].update(model=["1", 0])
    (work / "plain.json").write_text(json.dumps(plain))
    half = "Sampler.denoise=0.5"
    styled = run(url, work / "s0.png", "style_transfer", photo, steps, half, strength=0.0,
                 style=("strong.safetensors",))
    base = run(url, work / "plain.png", str(work / "plain.json"), photo, steps, half)
    diff = abs(pixels(styled) - pixels(base)).max()
    check("strength 0 == plain img2img, bit for bit", diff == 0, f"max pixel difference {diff}")


def check_masked_composite(url: str, work: Path, photo: Path, mask: Path, steps: int) -> None:
    out = run(url, work / "masked.png", "masked_style", photo, steps, style=("strong.safetensors",), mask=str(mask))
    outside = pixels(mask)[..., 0] == 0
    diff = abs(pixels(out) - pixels(photo))
    check("masked composite: outside the mask is the photo's", outside.any() and diff[outside].max() == 0,
          f"max difference outside {diff[outside].max()}, mean inside {diff[~outside].mean():.1f}")


def run_every_workflow(url: str, work: Path, photo: Path, mask: Path, steps: int,
                       timed: bool) -> dict[str, tuple[float, float]]:
    """Each bundled workflow once to warm up (model load), then once timed; seconds and peak VRAM (GiB)."""
    from stylora.workflows.client import bundled_workflows

    style_image = str(REPO / "examples" / "stylora_style.jpg")
    per_workflow = {
        "style_transfer": dict(style=("mystyle.safetensors",)),
        "masked_style": dict(style=("mystyle.safetensors",), mask=str(mask)),
        "style_blend": dict(style=("mystyle.safetensors", "strong.safetensors:0.5", "third.safetensors:0.5")),
        "style_metrics": dict(style=("mystyle.safetensors",), style_image=style_image),
        "style_from_image": dict(style_image=style_image),
        "layout_guard": dict(style=("mystyle.safetensors",), strength=1.0),  # denoise 1, the random ControlNet
        "dreambooth": dict(style=("sd15.safetensors",)),  # any SD1.5 checkpoint stands in for a DreamBooth one
        "textual_inversion": dict(),  # the shipped prompt's embedding is absent: ComfyUI warns and samples
        # one training step at 64 px: the node's cost per step is benchmarks/train_node_memory.py's
        "train_style": dict(set=("Train style.folder=paintings", "Train style.name=gpu_check", "Train style.steps=1",
                                 "Train style.resolution=64")),
    }
    check("every bundled workflow is covered", sorted(per_workflow) == bundled_workflows(), bundled_workflows())
    table = {}
    for name, extra in per_workflow.items():
        size = f"Content encode.max_side={pixels(photo).shape[0]}"
        sets = extra.pop("set", ())
        run(url, work / f"{name}.png", name, photo, steps, size, *sets, **extra)
        if timed:
            peak = VramPeak(url)
            start = time.monotonic()
            run(url, work / f"{name}.png", name, photo, steps, size, "Sampler.seed=4", *sets, **extra)
            table[name] = (time.monotonic() - start, peak.stop())
        say(f"ok   {name} ran")
    return table


class VramPeak:
    """The device's peak memory use while it runs, sampled from ComfyUI's /system_stats every 0.1 s (GiB)."""

    def __init__(self, url: str) -> None:
        self.url, self.peak, self._done = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            device = json.loads(get(self.url, "/system_stats"))["devices"][0]
            self.peak = max(self.peak, (device["vram_total"] - device["vram_free"]) / 2**30)
            time.sleep(0.1)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak


if __name__ == "__main__":
    main()
