"""Seconds per sampling step and peak memory of KSampler with and without Style From Image's injection, in
ComfyUI, on a full-size SD1.5 checkpoint (random weights cost the same as real ones).

    source /tmp/comfy_env.sh   # COMFYUI_DIR, COMFYUI_PYTHON, COMFYUI_PYTHONPATH
    python benchmarks/style_image_speed.py --checkpoint sd15.safetensors [--sizes 256 512] [--steps 3]

Each (size, mode) runs in its own ComfyUI process (so peak memory is its own): one warm-up step, then `--steps`
steps of euler with CFG on one photo, timed. Peak memory is the process's max RSS and its rise during sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(pack: str, ckpt: str, size: int, steps: int, styled: bool) -> dict:
    """Runs inside ComfyUI's python: one (size, mode) measurement."""
    import resource
    import time

    sys.path.insert(0, str(REPO / "tests"))
    from comfyui_env import load_pack, start_comfy

    start_comfy()
    import comfy.sd
    import torch

    import nodes

    module = load_pack(pack)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        photo, painting = torch.rand(1, size, size, 3, generator=gen), torch.rand(1, size, size, 3, generator=gen)
        latent = {"samples": vae.encode(photo)}
        (cond,), (uncond,) = nodes.CLIPTextEncode().encode(clip, ""), nodes.CLIPTextEncode().encode(clip, "")
        if styled:
            (model,) = module.NODE_CLASS_MAPPINGS["StyleFromImage"]().apply(model, painting, vae, latent)

        def sample(n: int) -> float:
            start = time.perf_counter()
            nodes.common_ksampler(model, 0, n, 5.0, "euler", "normal", cond, uncond, latent, denoise=1.0)
            return time.perf_counter() - start

        sample(1)  # warm-up: weights loaded and cast
        rss_before = _rss_mib()
        seconds = sample(steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "styled": styled, "s_per_step": seconds / steps, "peak_rss_mib": round(peak),
            "rise_mib": round(peak - rss_before)}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full-size SD1.5 .safetensors")
    p.add_argument("--sizes", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "size,styled" run in ComfyUI's python
    args = p.parse_args()
    if args.one:
        size, styled = args.one.split(",")
        print(json.dumps(measure(str(REPO), args.checkpoint, int(size), args.steps, styled == "1")))
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
        for styled in (False, True):
            proc = subprocess.run([python, str(Path(__file__).resolve()), "--checkpoint",
                                   str(Path(args.checkpoint).resolve()), "--steps", str(args.steps), "--one",
                                   f"{size},{int(styled)}"], cwd=comfy_dir, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'size':>5} {'mode':>8} {'s/step':>8} {'peak RSS MiB':>13} {'rise MiB':>9}")
    for r in rows:
        print(f"{r['size']:>5} {'StyleID' if r['styled'] else 'plain':>8} {r['s_per_step']:>8.2f} "
              f"{r['peak_rss_mib']:>13} {r['rise_mib']:>9}")
    for size in args.sizes:
        plain, styled = (next(r for r in rows if r["size"] == size and r["styled"] == s) for s in (False, True))
        print(f"{size}px: StyleID / plain = {styled['s_per_step'] / plain['s_per_step']:.2f}x time, "
              f"{styled['rise_mib'] / max(1, plain['rise_mib']):.2f}x sampling memory rise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
