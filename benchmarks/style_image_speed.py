"""Seconds per photo and peak memory of a folder run: plain img2img vs Style From Image's fast and paper modes, in
ComfyUI, on a full-size SD1.5 checkpoint (random weights cost the same as real ones).

    source /tmp/comfy_env.sh   # COMFYUI_DIR, COMFYUI_PYTHON, COMFYUI_PYTHONPATH
    python benchmarks/style_image_speed.py --checkpoint sd15.safetensors [--sizes 256 512] [--steps 2] [--photos 8]

Each (size, mode) runs in its own ComfyUI process (so peak memory is its own), as a folder run does: one painting,
`--photos` different photos, each encoded, styled by a fresh Style From Image (as a new queued prompt would) and
sampled with euler at CFG 1, denoise 1, `--steps` steps. The first photo is excluded from the mean (it pays for
loading the weights and, styled, for the painting's features, which later photos reuse). Peak memory is the
process's max RSS and its rise over the RSS after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("plain", "fast", "paper")


def measure(pack: str, ckpt: str, size: int, steps: int, photos: int, mode: str) -> dict:
    """Runs inside ComfyUI's python: one (size, mode) folder run."""
    import resource
    import time

    sys.path.insert(0, str(REPO / "tests"))
    from comfyui_env import load_pack, start_comfy

    start_comfy()
    import comfy.ldm.modules.attention
    import comfy.sd
    import torch

    import nodes

    module = load_pack(pack)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    gen = torch.Generator().manual_seed(0)
    seconds = []
    with torch.inference_mode():
        painting = torch.rand(1, size, size, 3, generator=gen)
        (cond,), (uncond,) = nodes.CLIPTextEncode().encode(clip, ""), nodes.CLIPTextEncode().encode(clip, "")
        rss_loaded = _rss_mib()
        for _ in range(photos):
            photo = torch.rand(1, size, size, 3, generator=gen)
            start = time.perf_counter()
            latent = {"samples": vae.encode(photo)}
            styled = model
            if mode != "plain":
                (styled,) = module.NODE_CLASS_MAPPINGS["StyleFromImage"]().apply(model, painting, vae, latent,
                                                                                 mode=mode)
            nodes.common_ksampler(styled, 0, steps, 1.0, "euler", "normal", cond, uncond, latent, denoise=1.0)
            seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    later = seconds[1:] or seconds
    return {"size": size, "mode": mode, "photos": photos, "steps": steps, "s_per_photo": sum(later) / len(later),
            "first_photo_s": seconds[0], "peak_rss_mib": round(peak), "rise_mib": round(peak - rss_loaded),
            "attention": comfy.ldm.modules.attention.optimized_attention.__name__}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full-size SD1.5 .safetensors")
    p.add_argument("--sizes", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--photos", type=int, default=8, help="photos in the folder run (the first is not counted)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "size,mode" run in ComfyUI's python
    args = p.parse_args()
    if args.one:
        size, mode = args.one.split(",")
        print(json.dumps(measure(str(REPO), args.checkpoint, int(size), args.steps, args.photos, mode)))
        return 0
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("set COMFYUI_DIR (and COMFYUI_PYTHON, COMFYUI_PYTHONPATH): source /tmp/comfy_env.sh", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (os.environ.get("COMFYUI_PYTHONPATH", ""), comfy_dir) if x)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            proc = subprocess.run([python, str(Path(__file__).resolve()), "--checkpoint",
                                   str(Path(args.checkpoint).resolve()), "--steps", str(args.steps), "--photos",
                                   str(args.photos), "--one", f"{size},{mode}"], cwd=comfy_dir, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'size':>5} {'mode':>6} {'photos':>6} {'s/photo':>8} {'first s':>8} {'peak RSS MiB':>13} {'rise MiB':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['mode']:>6} {r['photos']:>6} {r['s_per_photo']:>8.1f} {r['first_photo_s']:>8.1f} "
              f"{r['peak_rss_mib']:>13} {r['rise_mib']:>9}")
    for size in args.sizes:
        plain = next((r for r in rows if r["size"] == size and r["mode"] == "plain"), None)
        for r in rows:
            if plain and r["size"] == size and r["mode"] != "plain":
                print(f"{size}px: {r['mode']} / plain = {r['s_per_photo'] / plain['s_per_photo']:.2f}x time per "
                      f"photo (attention: {r['attention']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
