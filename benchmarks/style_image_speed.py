"""Seconds per photo and peak memory of a folder run: plain img2img vs Style From Image's fast and paper modes, in
ComfyUI, on a full-size SD1.5 checkpoint (random weights cost the same as real ones).

    source /tmp/comfy_env.sh   # COMFYUI_DIR, COMFYUI_PYTHON, COMFYUI_PYTHONPATH
    python benchmarks/style_image_speed.py --checkpoint sd15.safetensors [--sizes 256 512] [--steps 2] [--photos 8]

Each size runs in its own ComfyUI process (the checkpoint loaded once), as a folder run does: one painting,
`--photos` different photos, each encoded, styled by a fresh Style From Image (as a new queued prompt would),
sampled with euler at CFG 1, denoise 1, `--steps` steps, and decoded. The modes take turns photo by photo (plain,
fast, paper, plain, ...), so a change in the load of a shared machine reaches all three alike; the median per photo
is printed beside the mean because another process's burst lands on single photos. Each mode's first photo is
excluded (it pays for the painting's features, which later photos reuse). Peak memory is the
process's peak RSS during that photo (the kernel's high-water mark, reset before each photo), and its rise over
the RSS before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("plain", "fast", "paper")


def measure(pack: str, ckpt: str, size: int, steps: int, photos: int, modes: list[str]) -> list[dict]:
    """Runs inside ComfyUI's python: one size's folder run, the modes taking turns."""
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
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    with torch.inference_mode():
        painting = torch.rand(1, size, size, 3, generator=gen)
        (cond,), (uncond,) = nodes.CLIPTextEncode().encode(clip, ""), nodes.CLIPTextEncode().encode(clip, "")
        for _ in range(photos):
            photo = torch.rand(1, size, size, 3, generator=gen)
            for mode in modes:
                before = _reset_peak()
                start = time.perf_counter()
                latent = {"samples": vae.encode(photo)}
                styled = model
                if mode != "plain":
                    (styled,) = module.NODE_CLASS_MAPPINGS["StyleFromImage"]().apply(model, painting, vae, latent,
                                                                                     mode=mode)
                (samples,) = nodes.common_ksampler(styled, 0, steps, 1.0, "euler", "normal", cond, uncond, latent,
                                                   denoise=1.0)
                sampled = time.perf_counter() - start
                vae.decode(samples["samples"])  # a folder run saves every photo
                runs[mode].append((time.perf_counter() - start, sampled, _status_mib("VmHWM"), before))
                print(json.dumps({"size": size, "mode": mode, "s": runs[mode][-1][0], "sampling_s": sampled}),
                      file=sys.stderr, flush=True)
    out = []
    for mode, rs in runs.items():
        later = rs[1:] or rs
        out.append({"size": size, "mode": mode, "photos": photos, "steps": steps,
                    "s_per_photo": statistics.mean(r[0] for r in later),
                    "median_s": statistics.median(r[0] for r in later),
                    "sampling_s": statistics.median(r[1] for r in later), "first_photo_s": rs[0][0],
                    "peak_rss_mib": round(max(r[2] for r in later)), "rise_mib": round(max(r[2] - r[3] for r in later)),
                    "attention": comfy.ldm.modules.attention.optimized_attention.__name__})
    return out


def _reset_peak() -> float:
    """Resets the process's peak RSS to the current RSS (Linux: clear_refs 5); returns the current RSS, MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full-size SD1.5 .safetensors")
    p.add_argument("--sizes", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--photos", type=int, default=8, help="photos in the folder run (the first is not counted)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: the size run in ComfyUI's python
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(str(REPO), args.checkpoint, int(args.one), args.steps, args.photos, args.modes)))
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
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--checkpoint",
                               str(Path(args.checkpoint).resolve()), "--steps", str(args.steps), "--photos",
                               str(args.photos), "--modes", *args.modes, "--one", str(size)], cwd=comfy_dir, env=env,
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            return 1
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[-len(args.modes):]), flush=True)
    print(f"{'size':>5} {'mode':>6} {'photos':>6} {'mean s':>7} {'median s':>9} {'sampling s':>11} {'first s':>8} "
          f"{'peak RSS MiB':>13} {'rise MiB':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['mode']:>6} {r['photos']:>6} {r['s_per_photo']:>7.1f} {r['median_s']:>9.1f} "
              f"{r['sampling_s']:>11.1f} {r['first_photo_s']:>8.1f} {r['peak_rss_mib']:>13} {r['rise_mib']:>9}")
    for size in args.sizes:
        plain = next((r for r in rows if r["size"] == size and r["mode"] == "plain"), None)
        for r in rows:
            if plain and r["size"] == size and r["mode"] != "plain":
                print(f"{size}px: {r['mode']} / plain = {r['s_per_photo'] / plain['s_per_photo']:.2f}x mean, "
                      f"{r['median_s'] / plain['median_s']:.2f}x median time per photo, "
                      f"{r['sampling_s'] / plain['sampling_s']:.2f}x median encode+sampling "
                      f"(attention: {r['attention']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
