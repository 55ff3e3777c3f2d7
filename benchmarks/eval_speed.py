"""Metric throughput at 512x512: Stylora's SSIM, LPIPS and Gram style loss beside torchmetrics/kornia equivalents.

    python benchmarks/eval_speed.py [--batch 4] [--repeats 3] [--device cuda]

Feature networks use fixed random weights: the cost is the same as with the published ones, and the
benchmark needs no download. Equivalents that need torchvision (torchmetrics' LPIPS) are reported as
unavailable where it is not installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def images_per_second(fn, batch: int, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)

    import kornia
    from stylora.eval.metrics import LPIPS, VGGStyle, gram_matrix, ssim
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    rows: list[tuple[str, str, float | None, str]] = []

    def add(metric: str, impl: str, fn, note: str = "") -> None:
        try:
            rate = images_per_second(fn, args.batch, args.repeats, device)
        except Exception as e:  # an equivalent that cannot run here is reported, not fatal
            rate, note = None, f"unavailable ({type(e).__name__}: {str(e)[:60]})"
        rows.append((metric, impl, rate, note))
        print(f"  {metric:<6} {impl:<34} {'n/a' if rate is None else f'{rate:8.2f} img/s'} {note}", flush=True)

    add("SSIM", "stylora (kornia, valid window)", lambda: ssim(x, y))
    add("SSIM", "kornia.metrics.ssim (same padding)", lambda: kornia.metrics.ssim(x, y, 11).mean())
    add("SSIM", "torchmetrics SSIM", lambda: tm_ssim(x, y, data_range=1.0, reduction="none"))

    lp_alex = LPIPS("alex", pretrained=False).to(device)
    lp_vgg = LPIPS("vgg", pretrained=False).to(device)
    add("LPIPS", "stylora LPIPS alex", lambda: lp_alex(x, y))
    add("LPIPS", "stylora LPIPS vgg", lambda: lp_vgg(x, y))

    def torchmetrics_lpips(net: str):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        m = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device)
        return lambda: m(x, y)

    for net in ("alex", "vgg"):
        try:
            fn = torchmetrics_lpips(net)
        except Exception as e:  # torchmetrics' LPIPS imports torchvision and downloads weights
            rows.append(("LPIPS", f"torchmetrics LPIPS {net}", None, f"unavailable ({type(e).__name__})"))
            print(f"  LPIPS  torchmetrics LPIPS {net:<21} n/a unavailable ({type(e).__name__}: {str(e)[:80]})")
            continue
        add("LPIPS", f"torchmetrics LPIPS {net}", fn)

    vgg = VGGStyle(pretrained=False).to(device)
    target = vgg.grams(y)
    add("Gram", "stylora VGG-19 Gram loss", lambda: vgg.gram_loss(x, target))
    acts = vgg.activations(x)
    add("Gram", "Gram matrices only (5 layers)", lambda: [gram_matrix(acts[i]) for i in vgg.STYLE_TAPS],
        "(feature maps precomputed: the cost of the Gram step itself)")

    print(f"\n{args.batch} images of {args.size}x{args.size}, device {device}, median of {args.repeats} runs "
          "(random feature-network weights, same cost as the published ones)")
    print(f"{'metric':<7}| {'implementation':<36}| {'images/s':>9} | note")
    print("-" * 90)
    for metric, impl, rate, note in rows:
        print(f"{metric:<7}| {impl:<36}| {'n/a' if rate is None else f'{rate:9.2f}'} | {note}")


if __name__ == "__main__":
    main()
