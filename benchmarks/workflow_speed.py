"""Seconds per image of each bundled workflow on a running ComfyUI server (the inference target: < 5 s per
512x512 image on a T4-class GPU).

    python benchmarks/workflow_speed.py --server http://127.0.0.1:8188 --checkpoint v1-5-pruned-emaonly.safetensors \
        --style monet.safetensors [--size 512] [--steps 20] [--repeats 3] [--workflows style_transfer masked_style]

Each workflow runs once to warm up (model loading), then `--repeats` times with a new seed each time (so
ComfyUI's cache cannot skip the sampler); the table gives the median wall time per image as `stylora run` sees
it (upload, queue, sampling, decode, download). Random-weight checkpoints cost the same as real ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    from stylora.workflows.client import RunConfig, bundled_workflows, run_workflow

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--checkpoint", required=True, help="SD1.5 checkpoint name on the server")
    p.add_argument("--style", required=True, help="style LoRA name on the server")
    p.add_argument("--dreambooth", help="DreamBooth checkpoint name (default: --checkpoint)")
    p.add_argument("--size", type=int, default=512, help="content photo side in pixels")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workflows", nargs="+", default=bundled_workflows())
    args = p.parse_args()

    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="stylora-bench-"))
    photo, mask = tmp / "content.png", tmp / "mask.png"
    Image.open(REPO / "examples" / "stylora_content.jpg").resize((args.size, args.size)).save(photo)
    Image.open(REPO / "examples" / "stylora_mask.png").resize((args.size, args.size)).save(mask)
    extra = {"style_transfer": {}, "masked_style": {"mask": str(mask)}, "style_metrics": {
        "style_image": str(REPO / "examples" / "stylora_style.jpg")},
        "style_blend": {"style": (args.style, f"{args.style}:0.5")}}
    overrides = (f"Sampler.steps={args.steps}", f"Content encode.max_side={args.size}")
    rows = []
    for name in args.workflows:
        if name == "dreambooth":
            kw = {"style": (args.dreambooth or args.checkpoint,)}
        else:
            kw = {"checkpoint": args.checkpoint, "style": (args.style,), **extra.get(name, {})}
        times = []
        for i in range(args.repeats + 1):
            cfg = RunConfig(content=str(photo), out=str(tmp / f"{name}-{i}.png"), server=args.server, workflow=name,
                            seed=1000 + i, set=overrides, overwrite=True, **kw)
            t0 = time.perf_counter()
            result = run_workflow(cfg, say=lambda s: None, poll=0.1)
            if result.failed:
                print(f"{name}: failed: {result.failed[0][1]}", file=sys.stderr)
                break
            if i:  # the first run loads the models
                times.append(time.perf_counter() - t0)
        if times:
            rows.append((name, statistics.median(times), min(times)))
    print(f"\n{args.size}x{args.size}, {args.steps} steps, server {args.server}")
    print("| workflow | median s/image | best s/image |\n|---|---|---|")
    for name, med, best in rows:
        print(f"| {name} | {med:.2f} | {best:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
