"""Shared fixtures: a tiny SD1.5-shaped model (diffusers folder + single-file checkpoint) and image folders.

Everything is built from configs with fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from comfyui_env import comfyui_pythonpath
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "tests" / "fixtures" / "tiny_sd15"
SHARED_TOKENIZER = REPO.parent / "shared" / "fixtures" / "sd15_tokenizer"


# The core nodes' schema facts of ComfyUI 0.3.64 that the bundled workflows use (tools/build_workflows.py writes it).
CORE_NODES = REPO / "tests" / "fixtures" / "core_nodes-0.3.64.json"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """{'diffusers': folder, 'single_file': .safetensors, 'config': config folder for the single file}."""
    import torch
    from model_builders import build_random_pipeline, copy_config_folder, save_single_file
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd15")
    pipe = build_random_pipeline(TINY_CONFIG, seed=0)
    if SHARED_TOKENIZER.is_dir():  # the real SD1.x tokenizer files, when the machine has them
        pipe.tokenizer = CLIPTokenizer.from_pretrained(SHARED_TOKENIZER, model_max_length=77)
    assert pipe.tokenizer.model_max_length == 77
    pipe.save_pretrained(root / "diffusers")
    save_single_file(pipe, root / "tiny-sd15.safetensors", dtype=torch.float32)
    config = copy_config_folder(root / "diffusers", root / "config")
    return {"diffusers": root / "diffusers", "single_file": root / "tiny-sd15.safetensors", "config": config}


def skimage_photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
            "rocket": data.rocket()}


def skimage_textures() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in ("brick", "grass", "gravel", "camera", "moon", "text"):
        arr = getattr(data, name)()
        out[name] = np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr
    return out


def make_style_folder(folder: Path) -> Path:
    """Six 96x96 RGB 'paintings' made from scikit-image's textures."""
    folder.mkdir(parents=True)
    for name, arr in skimage_textures().items():
        Image.fromarray(arr).resize((96, 96), Image.Resampling.LANCZOS).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def style_folder(tmp_path) -> Path:
    return make_style_folder(tmp_path / "style")


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory) -> Path:
    """A full-size SD1.5 single-file checkpoint with random weights (about 2 GB, a minute to build), built once per
    test session and shared by every real-ComfyUI test module; COMFYUI_SD15_CKPT names an existing one instead.
    Rescaled to be samplable (build_random_pipeline's samplable=True): sampled images follow their inputs."""
    if os.environ.get("COMFYUI_SD15_CKPT"):
        return Path(os.environ["COMFYUI_SD15_CKPT"])
    from model_builders import build_random_pipeline, save_single_file
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    path = tmp_path_factory.mktemp("sd15") / "random-sd15.safetensors"
    return save_single_file(build_random_pipeline(SHIPPED_SD15_CONFIG, seed=0, samplable=True), path,
                            metadata={"stylora.test_model": "random SD1.5 weights, seed 0, samplable rescaling"})


CONTROLNET_NAME = "control_v11p_sd15_canny_fp16.safetensors"  # the layout_guard workflow's default file name


@pytest.fixture(scope="session")
def sd15_controlnet(tmp_path_factory) -> Path:
    """A full-size SD1.5 ControlNet with random weights in diffusers' layout (the layout of
    lllyasviel/control_v11p_sd15_canny), built with diffusers' ControlNetModel.from_unet from the shipped SD1.5 UNet
    config: no download. Its zero convolutions get small random weights too, so the guard visibly acts.
    COMFYUI_SD15_CONTROLNET names an existing one instead."""
    if os.environ.get("COMFYUI_SD15_CONTROLNET"):
        return Path(os.environ["COMFYUI_SD15_CONTROLNET"])
    return build_random_controlnet(tmp_path_factory.mktemp("controlnet") / CONTROLNET_NAME)


def build_random_controlnet(path: Path) -> Path:
    """Writes the random-weight SD1.5 ControlNet (see sd15_controlnet) to `path` (fp16 safetensors)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SHIPPED_SD15_CONFIG / "unet"))
    controlnet = ControlNetModel.from_unet(unet)
    del unet
    gen = torch.Generator().manual_seed(1)
    state = {}
    for k, v in controlnet.state_dict().items():
        if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) and k.endswith(".weight"):
            v = torch.randn(v.shape, generator=gen) * 0.02
        state[k] = v.to(torch.float16).contiguous()
    save_file(state, str(path))
    return path


def place_controlnet(comfy_server: dict, controlnet: Path) -> str:
    """Link the ControlNet into the test server's models/controlnet (ComfyUI rescans a folder whose mtime changed);
    returns the name ControlNetLoader lists."""
    folder = comfy_server["base"] / "models" / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CONTROLNET_NAME
    if not target.exists():
        target.symlink_to(controlnet)
    return CONTROLNET_NAME


@pytest.fixture(scope="module", params=["fake", pytest.param("real", marks=pytest.mark.comfyui)])
def host(request):
    """The host the patcher behaviour tests run on (tests/fake_host.py): the fake ModelPatcher, and ComfyUI's own
    when COMFYUI_DIR is set (imported into this process on the CPU; its modules are taken out of sys.modules and
    sys.path is restored when the test module ends, so later tests see no ComfyUI)."""
    from fake_host import FakeHost, RealHost, import_real_comfyui

    if request.param == "fake":
        yield FakeHost()
        return
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set (see ../shared/comfyui/README.md)")
    import sys

    modules, path = set(sys.modules), list(sys.path)
    try:
        yield RealHost(import_real_comfyui())
    finally:
        added = tuple(p for p in sys.path if p not in path)  # COMFYUI_DIR and its torchvision stand-in
        ours = [name for name in set(sys.modules) - modules if _loaded_from(sys.modules[name], added)]
        for name in ours:  # found first, removed after: a namespace package's path is looked up via its parent
            del sys.modules[name]
        sys.path[:] = path


def _loaded_from(module, folders: tuple[str, ...]) -> bool:
    """Whether `module` (a file or a namespace package) was loaded from one of `folders`."""
    spec = getattr(module, "__spec__", None)
    places = [getattr(spec, "origin", None) or "", *(getattr(spec, "submodule_search_locations", None) or ())]
    return any(str(place).startswith(folders) for place in places)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """STYLORA_REQUIRE_HOST=1 (set by .ci/run once it has built ComfyUI and a browser): a real-host test that skips
    is a failure, so a broken host set-up cannot pass as green."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("STYLORA_REQUIRE_HOST") == "1" and item.get_closest_marker("comfyui"):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"real-host test skipped although STYLORA_REQUIRE_HOST=1: {reason}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_server(sd15_checkpoint, tmp_path_factory):
    """ComfyUI started on loopback with its own base directory: the pack linked into custom_nodes, the SD1.5
    checkpoint in models/checkpoints, a style trained here by our trainer in models/styles. One server per test
    session, shared by the real-ComfyUI and browser modules (start-up and the style's training cost minutes)."""
    import torch
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    base = tmp_path_factory.mktemp("comfy")
    for sub in ("custom_nodes", "models/checkpoints", "models/styles", "input", "output"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "stylora").symlink_to(REPO)
    (base / "models" / "checkpoints" / "sd15.safetensors").symlink_to(sd15_checkpoint)
    style_folder = make_style_folder(base / "paintings")
    train_lora(LoraTrainConfig(data=str(style_folder), output=str(base / "models" / "styles" / "mystyle.safetensors"),
                               base_model=str(sd15_checkpoint), resolution=64, steps=1, batch_size=1, min_images=1,
                               checkpoint_every=0), progress=False)
    # A second style: the same modules with large random weights, so its effect shows after one 8-bit save.
    from safetensors.torch import save_file
    from stylora.core.lora_file import read_lora

    state, meta = read_lora(base / "models" / "styles" / "mystyle.safetensors")
    gen = torch.Generator().manual_seed(0)
    strong = {k: v if k.endswith(".alpha") else (torch.randn(v.shape, generator=gen) * 0.2).to(v.dtype)
              for k, v in state.items()}
    save_file(strong, str(base / "models" / "styles" / "strong.safetensors"), metadata=meta)
    with comfyui_process(base) as url:
        yield {"url": url, "base": base, "log": base / "server.log"}


@contextlib.contextmanager
def comfyui_process(base: Path, *extra_args: str, log_name: str = "server.log", cpu: bool = True):
    """ComfyUI (COMFYUI_DIR) serving `base` on a free loopback port, on the CPU (cpu=False: its default device and
    model patcher); yields its URL, stops it after. extra_args go to main.py (e.g. another frontend:
    --front-end-root DIR --user-directory DIR)."""
    import subprocess
    import sys
    import time
    import urllib.request

    env = dict(os.environ, STYLORA_OFFLINE="1")
    env["PYTHONPATH"] = comfyui_pythonpath()
    port = _free_port()
    log = open(base / log_name, "w")
    proc = subprocess.Popen([os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", *(["--cpu"] if cpu else []),
                             "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base), *extra_args],
                            cwd=os.environ["COMFYUI_DIR"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # start-up on a loaded 2-core machine: about a minute, rarely more
        while True:
            try:
                urllib.request.urlopen(url + "/queue", timeout=5)
                break
            except OSError:
                log_tail = (base / log_name).read_text()[-3000:]
                assert proc.poll() is None, f"ComfyUI exited with {proc.returncode} while starting:\n{log_tail}"
                assert time.monotonic() < deadline, f"ComfyUI did not answer {url}/queue within 600 s:\n{log_tail}"
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def count_calls(monkeypatch, module, names: tuple[str, ...]) -> dict[str, int]:
    """Wrap `module.<name>` for each name so that calls are counted (the functions still run); the live counts."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return counts


@pytest.fixture
def one_thread_and_an_empty_feature_cache():
    """Style From Image's tests: its painting-feature cache empty before and after, and torch on one thread (the
    tiny UNet is far slower on two threads of a shared, loaded CPU)."""
    import torch
    from stylora.nodes.style_image import PAINTING_FEATURES

    PAINTING_FEATURES.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    PAINTING_FEATURES.clear()
