"""Training speed and peak memory: Stylora's trainer beside two plain loops of the same shape.

- minimal: only what the style-LoRA recipe must do per step: cached latents and prompt embeddings, UNet forward and
  backward, AdamW on the LoRA weights. The trainer's overhead (accelerate, logs, checkpoints' bookkeeping, its
  recipe objects) is the gap between it and this loop.
- reference: the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py: VAE encode and text encode
  every step, UNet forward/backward, AdamW on the LoRA weights.
Each run is a fresh process so that peak memory (CUDA max allocated, or the process's peak RSS on CPU) belongs to
that run alone; --repeats runs every implementation that often, interleaved, and reports the medians (a shared
machine's load shifts during a benchmark).

    python benchmarks/train_speed.py                       # tiny@64, SD1.5@256, SD1.5@512
    python benchmarks/train_speed.py --cases sd15:256 --steps 3 --repeats 3 --sd15 /path/sd15.safetensors

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


def prepare(workdir: Path, cases: list[tuple[str, int]], sd15: str | None = None) -> dict[str, str]:
    """Base models and a style folder in workdir (reused across runs)."""
    import numpy as np
    from model_builders import build_random_pipeline, save_single_file
    from PIL import Image
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"tiny": str(workdir / "tiny-diffusers"), "sd15": str(workdir / "random-sd15.safetensors"),
             "data": str(workdir / "style")}
    if any(m == "tiny" for m, _ in cases) and not Path(paths["tiny"]).is_dir():
        build_random_pipeline(TINY_CONFIG, seed=0).save_pretrained(paths["tiny"])
    if sd15:
        paths["sd15"] = sd15
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


def worker_minimal(model: str, res: int, args, paths: dict[str, str]) -> dict:
    """Only what the recipe must do per step: cached latents and prompt embedding, UNet forward and backward, AdamW
    on the LoRA weights (rank 4 on the attention projections, as the trainer's defaults)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from stylora.core.resources import peak_memory_mb
    from stylora.trainer.dataset import encode_latents, encode_prompt, load_style_dataset

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    base = load_components(model, paths)
    unet, vae = base.unet, base.vae
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    unet.to(device, dtype)
    vae.to(device, torch.float32)
    base.text_encoder.to(device, dtype)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    ds = load_style_dataset(paths["data"], res, min_images=1)
    with torch.no_grad():
        cond = encode_prompt(base.tokenizer, base.text_encoder, "", device)  # [77, D]
    means, stds = encode_latents(vae, ds, False, device, False)[0]
    base.text_encoder.to("cpu")
    vae.to("cpu")
    scaling = float(vae.config.scaling_factor)
    unet.train()
    times = []
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = [(step * args.batch_size + i) % len(ds) for i in range(args.batch_size)]
        mean, std = torch.stack([means[i] for i in ids]), torch.stack([stds[i] for i in ids])
        latents = ((mean + std * torch.randn(mean.shape, generator=g)) * scaling).to(device, dtype)
        noise = torch.randn(latents.shape, generator=g).to(device, dtype)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(ids),), generator=g).to(device)
        states = cond[None].expand(len(ids), -1, -1).to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, states, return_dict=False)[0]
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[1:] or times
    return {"steps_per_s": 1 / statistics.median(timed), "peak_mb": peak_memory_mb(str(device))}


IMPLS = {"stylora": worker_stylora, "minimal": worker_minimal, "reference": worker_reference}


def median_result(results: list[dict | None]) -> dict | None:
    """The median steps/s and the median peak memory of the runs that finished (None when none did)."""
    done = [r for r in results if r]
    if not done:
        return None
    return {"steps_per_s": statistics.median(r["steps_per_s"] for r in done),
            "peak_mb": statistics.median(r["peak_mb"] for r in done), "runs": len(done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny:64,sd15:256,sd15:512", help="model:resolution, comma separated")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each implementation, interleaved")
    parser.add_argument("--impls", default="stylora,minimal,reference", help="implementations to run")
    parser.add_argument("--sd15", default=None, help="a full-size SD1.5 .safetensors to use instead of building one")
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
        paths = prepare(Path(args.workdir), [(model, int(res))], args.sd15)
        print("RESULT " + json.dumps(IMPLS[impl](model, int(res), args, paths)), flush=True)
        return

    prepare(Path(args.workdir), cases, args.sd15)
    impls = args.impls.split(",")
    rows = []
    for model, res in cases:
        runs: dict[str, list[dict | None]] = {impl: [] for impl in impls}
        for repeat in range(args.repeats):
            for impl in impls:  # interleaved: a change of the machine's load hits every implementation alike
                cmd = [sys.executable, __file__, "--worker", impl, model, str(res), "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--mixed-precision", args.mixed_precision,
                       "--device", args.device, "--workdir", args.workdir]
                if args.sd15:
                    cmd += ["--sd15", args.sd15]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(f"{impl} {model}@{res} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    runs[impl].append(None)
                else:
                    runs[impl].append(json.loads(line[len("RESULT "):]))
                print(f"  run {repeat + 1} {impl:<9} {model}@{res}: {runs[impl][-1]} "
                      f"({time.time() - t0:.0f} s with loading)", flush=True)
        rows.append({"model": model, "res": res, **{impl: median_result(runs[impl]) for impl in impls}})

    print(f"\nTraining step, batch {args.batch_size}, LoRA rank 4 on attention, device {args.device}, "
          f"mixed precision {args.mixed_precision}; medians over {args.repeats} interleaved run(s) of "
          f"{max(1, args.steps - 1)} timed steps")
    head = f"{'model':<6} {'res':>4} | " + " | ".join(f"{impl + ' steps/s':>17} {'peak MB':>8}" for impl in impls)
    head += " | stylora/minimal"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [f"{r[i]['steps_per_s']:>17.4f} {r[i]['peak_mb']:>8.0f}" if r[i] else f"{'failed':>26}"
                 for i in impls]
        s_, m_ = r.get("stylora"), r.get("minimal")
        ratio = f"{s_['steps_per_s'] / m_['steps_per_s']:.3f}x" if s_ and m_ else "n/a"
        print(f"{r['model']:<6} {r['res']:>4} | " + " | ".join(cells) + f" | {ratio:>15}")


if __name__ == "__main__":
    main()
