"""Memory and time of Train Style LoRA inside ComfyUI's process, the way a graph runs it: Load Checkpoint's MODEL and
CLIP loaded by ComfyUI first, then the node (which unloads ComfyUI's models, trains with its own copy, and applies
the style to the MODEL it was given).

Run with ComfyUI's python, from anywhere:

    COMFYUI_DIR=~/ComfyUI $COMFYUI_PYTHON benchmarks/train_node_memory.py --checkpoint sd15.safetensors \\
        --resolution 256 --steps 3

Prints one JSON line: the process's resident memory (MiB) at start, after ComfyUI loaded the checkpoint, its peak
(VmHWM) over the training, and after the node returned; the trainer's recorded peak and seconds per step. A CUDA
run also prints the trainer's CUDA peak (max allocated), the figure that decides whether it fits a card.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_paintings(folder: Path, side: int, count: int = 6) -> None:
    """`count` smooth random colour fields of side x side pixels (the cost does not depend on the pictures)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"p{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an SD1.5 single-file .safetensors")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device-args", default="--cpu", help="ComfyUI arguments for the device (\"\" on a GPU)")
    args = parser.parse_args()

    # 1. A ComfyUI base folder: the checkpoint, a styles folder, paintings in input/.
    base = Path(tempfile.mkdtemp(prefix="stylora-node-memory-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "sd15.safetensors").symlink_to(Path(args.checkpoint).resolve())
    make_paintings(base / "input" / "paintings", max(args.resolution, 128))
    sys.argv = [sys.argv[0], *args.device_args.split(), "--base-directory", str(base)]
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd
    import folder_paths

    # 2. The pack, loaded as ComfyUI loads a custom node.
    spec = importlib.util.spec_from_file_location("stylora_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["stylora_pack"] = pack
    spec.loader.exec_module(pack)
    train_style = pack.NODE_CLASS_MAPPINGS["TrainStyle"]
    start_rss = rss_mb("VmRSS")

    # 3. Load Checkpoint, as the graph does before the node runs.
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", "sd15.safetensors"), output_vae=True, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    loaded_rss = rss_mb("VmRSS")

    # 4. The node: unload, train, apply.
    t0 = time.perf_counter()
    train_style().train(ckpt_name="sd15.safetensors", folder="paintings", name="bench", steps=args.steps, rank=4,
                        learning_rate=1e-4, resolution=args.resolution, seed=0, model=model, clip=clip)
    seconds = time.perf_counter() - t0
    record = json.loads((base / "models" / "styles" / "bench.resources.json").read_text())
    print(json.dumps({
        "resolution": args.resolution, "steps": args.steps, "device": record.get("device"),
        "rss_start_mb": round(start_rss), "rss_checkpoint_loaded_mb": round(loaded_rss),
        "peak_rss_mb": round(rss_mb("VmHWM")), "rss_after_mb": round(rss_mb("VmRSS")),
        "trainer_peak_mb": round(record["peak_memory_mb"]),
        "seconds_per_step": round(record["loop_seconds"] / max(1, args.steps), 2), "node_seconds": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
