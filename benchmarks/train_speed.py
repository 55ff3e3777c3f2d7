"""Training speed and peak memory: Stylora's trainer beside a plain diffusers + peft step of the same shape.

The reference is the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py: VAE encode
and text encode every step, UNet forward/backward, AdamW on the LoRA weights. Stylora's trainer caches
latents and prompt embeddings instead. Each case runs in a fresh process so that peak memory (CUDA
max allocated, or the process's peak RSS on CPU) belongs to that case alone.

    python benchmarks/train_speed.py                       # tiny@64, SD1.5@256, SD1.5@512
    python benchmarks/train_speed.py --cases sd15:512 --steps 5 --batch-size 2

The full-size SD1.5 architecture uses random weights (same cost as the real ones); the checkpoint is
made once in --workdir (about 2 GB, fp16 single file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # model_builders: the random-weight test models
TINY_CONFIG = REPO / "tests" / "fixtures" / "tiny_sd15"


def prepare(workdir: Path, cases: list[tuple[str, int]]) -> dict[str, str]:
    """Base models and a style folder in workdir (reused across runs)."""
    import numpy as np
    from PIL import Image
    from model_builders import build_random_pipeline, save_single_file
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"tiny": str(workdir / "tiny-diffusers"), "sd15": str(workdir / "random-sd15.safetensors"),
             "data": str(workdir / "style")}
    if any(m == "tiny" for m, _ in cases) and not Path(paths["tiny"]).is_dir():
        build_random_pipeline(TINY_CONFIG, seed=0).save_pretrained(paths["tiny"])
    if any(m == "sd15" for m, _ in cases) and not Path(paths["sd15"]).is_file():
        print("building a random-weight full-size SD1.5 checkpoint (once) ...", flush=True)
        save_single_file(build_random_pipeline(SHIPPED_SD15_CONFIG, seed=0), paths["sd15"])
    data = Path(paths["data"])
    if not data.is_dir():
        data.mkdir()
        try:
            from skimage import data as sk

            images = [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket()]
        except ImportError:
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 255, (600, 600, 3), dtype=np.uint8) for _ in range(4)]
        for i, arr in enumerate(images * 2):
            Image.fromarray(arr).resize((640, 640)).save(data / f"{i}.png")
    return paths


def load_components(model: str, paths: dict[str, str]):
    from stylora.trainer.base_model import load_base_model

    return load_base_model(paths[model])


def worker_stylora(model: str, res: int, args, paths: dict[str, str]) -> dict:
    import torch
    from stylora.core.resources import peak_memory_mb
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    out = Path(args.workdir) / f"bench-{model}-{res}.safetensors"
    cfg = LoraTrainConfig(data=paths["data"], output=str(out), base_model=paths[model], resolution=res,
                          steps=args.steps, batch_size=args.batch_size, checkpoint_every=0, log_every=10**6,
                          min_images=1, mixed_precision=args.mixed_precision, warmup_steps=0)
    result = train_lora(cfg, overwrite=True, progress=False)
    timed = result.step_seconds[1:] or result.step_seconds
    return {"steps_per_s": 1 / statistics.median(timed), "peak_mb": peak_memory_mb(str(torch.device(args.device)))}


def worker_reference(model: str, res: int, args, paths: dict[str, str]) -> dict:
    """The train_text_to_image_lora.py step, as plain as it is there."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from stylora.core.resources import peak_memory_mb
    from stylora.trainer.dataset import load_style_dataset

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    base = load_components(model, paths)
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    unet.to(device, dtype)
    vae.to(device, dtype)
    text_encoder.to(device, dtype)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    ds = load_style_dataset(paths["data"], res, min_images=1)
    input_ids = tokenizer([""] * args.batch_size, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)
    unet.train()
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = [(step * args.batch_size + i) % len(ds) for i in range(args.batch_size)]
        pixel_values = (torch.stack([ds.pixels[i] for i in ids]).float() / 127.5 - 1).to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[1:] or times
    return {"steps_per_s": 1 / statistics.median(timed), "peak_mb": peak_memory_mb(str(device))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny:64,sd15:256,sd15:512", help="model:resolution, comma separated")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "RES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]

    if args.worker:
        impl, model, res = args.worker
        paths = prepare(Path(args.workdir), [(model, int(res))])
        fn = worker_stylora if impl == "stylora" else worker_reference
        print("RESULT " + json.dumps(fn(model, int(res), args, paths)), flush=True)
        return

    prepare(Path(args.workdir), cases)
    rows = []
    for model, res in cases:
        row = {"model": model, "res": res}
        for impl in ("stylora", "reference"):
            cmd = [sys.executable, __file__, "--worker", impl, model, str(res), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--mixed-precision", args.mixed_precision,
                   "--device", args.device, "--workdir", args.workdir]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{impl} {model}@{res} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                row[impl] = None
            else:
                row[impl] = json.loads(line[len("RESULT "):])
            print(f"  {impl:<9} {model}@{res}: {row[impl]} ({time.time() - t0:.0f} s with loading)", flush=True)
        rows.append(row)

    print(f"\nTraining step, batch {args.batch_size}, LoRA rank 4 on attention, device {args.device}, "
          f"mixed precision {args.mixed_precision}, median of {max(1, args.steps - 1)} timed steps")
    head = f"{'model':<6} {'res':>4} | {'stylora steps/s':>15} {'peak MB':>9} | {'diffusers+peft steps/s':>22} " \
           f"{'peak MB':>9} | {'speed ratio':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        s, ref = r["stylora"], r["reference"]
        ratio = f"{s['steps_per_s'] / ref['steps_per_s']:.2f}x" if s and ref else "n/a"
        fs = (f"{s['steps_per_s']:>15.3f} {s['peak_mb']:>9.0f}") if s else f"{'failed':>25}"
        fr = (f"{ref['steps_per_s']:>22.3f} {ref['peak_mb']:>9.0f}") if ref else f"{'failed':>32}"
        print(f"{r['model']:<6} {r['res']:>4} | {fs} | {fr} | {ratio:>11}")


if __name__ == "__main__":
    main()
