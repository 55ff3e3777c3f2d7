"""Evaluation metrics and `stylora eval`: agreement with reference computations, invariants, reports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import skimage_photos, skimage_textures
from PIL import Image, ImageFilter
from stylora.eval.metrics import LPIPS, InceptionFeatures, VGGStyle, as_bchw, fid, kid, ssim


def _t(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> [1, 3, H, W] float 0..1."""
    return torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1)[None]


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius)))


@pytest.fixture(scope="module")
def random_nets():
    return {"lpips": LPIPS("alex", pretrained=False), "lpips_vgg": LPIPS("vgg", pretrained=False),
            "vgg": VGGStyle(pretrained=False), "inception": InceptionFeatures(pretrained=False)}


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_ssim_matches_scikit_image(name):
    from skimage.metrics import structural_similarity

    a = skimage_photos()[name]
    for radius in (1.0, 3.0):
        b = _blur(a, radius)
        ref = structural_similarity(b / 255.0, a / 255.0, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        ours = ssim(_t(b), _t(a)).item()
        assert abs(ours - ref) < 1e-3, (name, radius, ours, ref)
    assert ssim(_t(a), _t(a)).item() == pytest.approx(1.0, abs=1e-5)


def test_comfyui_and_torch_layouts_agree_and_sizes_are_explicit():
    a, b = skimage_photos()["coffee"], _blur(skimage_photos()["coffee"], 2)
    bchw, bhwc = _t(a), _t(a).permute(0, 2, 3, 1)
    assert torch.equal(as_bchw(bhwc), bchw)
    assert ssim(_t(b).permute(0, 2, 3, 1), bhwc).item() == pytest.approx(ssim(_t(b), bchw).item(), abs=1e-7)
    with pytest.raises(ValueError, match=r"output is 300x200 but content is 600x400"):
        ssim(torch.rand(1, 3, 200, 300), bchw)
    with pytest.raises(ValueError, match="values must be in 0..1"):
        ssim(bchw * 255, bchw)


def test_fid_and_kid_equal_direct_numpy_scipy():
    from scipy import linalg

    rng = np.random.default_rng(0)
    f1 = rng.normal(0, 1, (64, 16))
    f2 = rng.normal(0.3, 1.2, (48, 16)) + rng.normal(0, 0.1, (48, 1))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    direct_fid = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(f1, f2) == pytest.approx(direct_fid, rel=1e-9)
    assert fid(f1, f1) == pytest.approx(0.0, abs=1e-6)

    # KID on whole sets of equal size: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written out as sums.
    x, y = f1[:40], f2[:40]
    m, d = 40, x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kid(x, y, subsets=3, subset_size=m)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_gram_loss_is_zero_for_identical_inputs_and_symmetric(random_nets):
    vgg = random_nets["vgg"]
    a, b = _t(skimage_photos()["chelsea"][::2, ::2].copy()), _t(skimage_textures()["brick"][:150, :201].copy())
    assert vgg.gram_loss(a, a).item() == 0.0
    assert vgg.gram_loss(a, b).item() > 0
    assert vgg.gram_loss(a, b).item() == pytest.approx(vgg.gram_loss(b, a).item(), rel=1e-6)  # sizes may differ
    assert vgg.content_loss(a, a).item() == 0.0


@pytest.mark.parametrize("net", ["lpips", "lpips_vgg"])
def test_lpips_is_zero_for_identical_inputs_and_grows_with_blur(random_nets, net):
    lp = random_nets[net]
    a = skimage_photos()["astronaut"][::2, ::2].copy()
    d = [lp(_t(a), _t(_blur(a, r))).item() for r in (0.0, 1.0, 3.0, 6.0)]
    assert d[0] == pytest.approx(0.0, abs=1e-7)
    assert d[0] < d[1] < d[2] < d[3], d


def test_inception_matches_the_published_fid_layout():
    net = InceptionFeatures(pretrained=False)
    sd = net.net.state_dict()
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert len([k for k in sd if k.endswith("running_var")]) == 94  # every BasicConv2d of Inception-v3
    published = {**sd, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    net.net.load_published(published)  # the classifier head of the published file is ignored
    assert net(torch.rand(2, 3, 64, 80)).shape == (2, 2048)


def _eval_folders(tmp_path):
    photos, textures = skimage_photos(), skimage_textures()
    dirs = {k: tmp_path / k for k in ("content", "soft", "hard", "style")}
    for d in dirs.values():
        d.mkdir()
    for name, arr in photos.items():
        small = np.asarray(Image.fromarray(arr).resize((96, 64)))
        Image.fromarray(small).save(dirs["content"] / f"{name}.png")
        Image.fromarray(_blur(small, 1)).save(dirs["soft"] / f"{name}.png")
        Image.fromarray(_blur(small, 4)).save(dirs["hard"] / f"{name}.jpg")
    for name, arr in list(textures.items())[:4]:
        Image.fromarray(arr).resize((80, 80)).save(dirs["style"] / f"{name}.png")
    return dirs


def test_report_files_exist_and_parse(tmp_path, random_nets):
    from stylora.eval.report import EvalConfig, evaluate

    dirs = _eval_folders(tmp_path)
    (dirs["hard"] / "extra.png").write_bytes((dirs["hard"] / "coffee.jpg").read_bytes())  # no content twin
    out = tmp_path / "report"
    cfg = EvalConfig(content=str(dirs["content"]), styled=(str(dirs["soft"]), str(dirs["hard"])), out=str(out),
                     style=str(dirs["style"]), kid_subsets=5, cache_dir=str(tmp_path / "cache"))
    report = evaluate(cfg, nets=random_nets, progress=False)
    data = json.loads((out / "report.json").read_text())
    assert set(data["methods"]) == {"soft", "hard"} and data["unavailable"] == {}
    assert data["methods"]["hard"]["unmatched"] == ["extra"]
    for method in data["methods"].values():
        assert method["images"] == 4
        assert set(method["set"]) >= {"fid", "kid", "artfid"}
        assert method["set"]["artfid"] == pytest.approx((1 + method["mean"]["lpips"]) * (1 + method["set"]["fid"]))
    assert data["methods"]["soft"]["mean"]["ssim"] > data["methods"]["hard"]["mean"]["ssim"]
    assert data["methods"]["soft"]["mean"]["lpips"] < data["methods"]["hard"]["mean"]["lpips"]
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 8 and {"method", "image", "ssim", "lpips", "lpips_vgg", "content", "gram"} <= set(rows[0])
    assert all(0 < float(r["ssim"]) <= 1 for r in rows)
    md = (out / "report.md").read_text()
    assert "| soft | 4 |" in md and "artfid" in md
    for png in ["grid.png", "plot_ssim.png", "plot_lpips.png", "plot_gram.png", "plot_fid.png",
                "plot_content_vs_style.png"]:
        with Image.open(out / png) as im:
            im.verify()
    assert report["methods"]["soft"]["images"] == 4


def test_missing_weights_reported_unavailable_and_exit_zero(tmp_path, monkeypatch, capsys):
    from stylora.cli import main

    dirs = _eval_folders(tmp_path)
    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("STYLORA_WEIGHTS_DIR", raising=False)
    code = main(["eval", "--content", str(dirs["content"]), "--styled", str(dirs["soft"]), "--style",
                 str(dirs["style"]), "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "unavailable: lpips: alexnet-owt-7be5be79.pth missing; see README" in out
    assert "torchvision AlexNet (ImageNet): not found in" in out  # where to get it, on the next line
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(data["unavailable"]) == {"lpips", "lpips_vgg", "content", "lpips_style", "gram", "fid", "kid", "artfid"}
    assert data["methods"]["soft"]["mean"]["ssim"] > 0.5


def test_size_mismatch_is_reported_not_resized(tmp_path, random_nets):
    from stylora.eval.report import EvalConfig, evaluate

    dirs = _eval_folders(tmp_path)
    Image.open(dirs["soft"] / "rocket.png").resize((48, 32)).save(dirs["soft"] / "rocket.png")
    cfg = EvalConfig(content=str(dirs["content"]), styled=(str(dirs["soft"]),), out=str(tmp_path / "a"),
                     metrics=("ssim", "lpips"))
    rows = {r["image"]: r for r in evaluate(cfg, nets=random_nets, progress=False)["methods"]["soft"]["rows"]}
    assert "size mismatch: content 96x64, output 48x32" in rows["rocket"]["error"] and "ssim" not in rows["rocket"]
    cfg = EvalConfig(content=str(dirs["content"]), styled=(str(dirs["soft"]),), out=str(tmp_path / "b"),
                     metrics=("ssim",), resize_content=True)
    rows = {r["image"]: r for r in evaluate(cfg, nets=random_nets, progress=False)["methods"]["soft"]["rows"]}
    assert rows["rocket"]["resized_content"] == "96x64 -> 48x32" and 0 < rows["rocket"]["ssim"] <= 1


def test_style_set_features_are_cached_by_fingerprint(tmp_path, random_nets):
    from stylora.eval.report import EvalConfig, evaluate

    dirs = _eval_folders(tmp_path)
    inception = InceptionFeatures(pretrained=False)
    inception.published = True  # treat as the published network so its features are cached
    nets = {**random_nets, "inception": inception}
    cfg = EvalConfig(content=str(dirs["content"]), styled=(str(dirs["soft"]),), out=str(tmp_path / "r1"),
                     style=str(dirs["style"]), metrics=("fid",), cache_dir=str(tmp_path / "cache"))
    first = evaluate(cfg, nets=nets, progress=False)
    cached = list((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 1
    second = evaluate(EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "r2")}), nets=nets, progress=False)
    assert second["methods"]["soft"]["set"]["fid"] == pytest.approx(first["methods"]["soft"]["set"]["fid"])


def test_cross_check_against_reference_packages():
    """Where torchvision and lpips are installed (a ComfyUI machine, a GPU box), compare with them."""
    pytest.importorskip("torchvision")
    lpips = pytest.importorskip("lpips")
    a = skimage_photos()["astronaut"][::2, ::2].copy()
    x, y = _t(a), _t(_blur(a, 2))
    ref = lpips.LPIPS(net="alex", verbose=False)(x * 2 - 1, y * 2 - 1).item()
    assert LPIPS("alex")(x, y).item() == pytest.approx(ref, rel=1e-4)


def test_perceptual_terms_backpropagate_into_lora_weights_only(tiny_model):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from stylora.eval.metrics import PerceptualLoss
    from stylora.trainer.losses import perceptual_terms

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model["diffusers"]), safety_checker=None,
                                                   requires_safety_checker=False)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in pipe.unet.named_parameters():  # a non-zero B so every LoRA factor gets a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    perceptual = PerceptualLoss(pretrained=False)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    target = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 150])
    noisy = sched.add_noise(latents, torch.randn_like(latents), t)
    cond = pipe.text_encoder(pipe.tokenizer([""] * 2, padding="max_length", max_length=77,
                                            return_tensors="pt").input_ids)[0]
    pred = pipe.unet(noisy, t, cond).sample
    lp, gram = perceptual_terms(sched, pipe.vae, perceptual, noisy, pred, t, target, pipe.vae.config.scaling_factor)
    (lp.sum() + 1e3 * gram.sum()).backward()
    with_grad = {n for n, p in pipe.unet.named_parameters() if p.grad is not None}
    lora = {n for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert with_grad == lora
    # At 64 px the mid-block is 1x1: its self-attention sees a single token, softmax over one key is 1 whatever
    # q and k are, so mid-block attn1 to_q/to_k get no gradient by construction (exactly 0, or float round-off
    # of ~1e-12 depending on the attention kernel). Every other adapter must get a real gradient.
    one_token = {n for n in lora if n.startswith("mid_block.") and (".attn1.to_q." in n or ".attn1.to_k." in n)}
    assert len(one_token) == 4  # lora_A and lora_B of to_q and to_k
    grad = {n: pipe.unet.get_parameter(n).grad.abs().max().item() for n in lora}
    scale = max(grad.values())
    assert all(grad[n] <= 1e-6 * scale for n in one_token), {n: grad[n] for n in one_token}
    assert all(grad[n] > 1e-6 * scale for n in lora - one_token), min((grad[n], n) for n in lora - one_token)
    frozen = [*pipe.vae.parameters(), *perceptual.parameters(), *pipe.text_encoder.parameters()]
    assert all(p.grad is None for p in frozen)


def test_training_with_perceptual_terms(tiny_model, style_folder, tmp_path):
    from stylora.core.lora_file import read_lora
    from stylora.eval.metrics import PerceptualLoss
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "p.safetensors"),
                          base_model=str(tiny_model["diffusers"]), resolution=64, steps=2, batch_size=2,
                          min_images=1, checkpoint_every=0, lpips_weight=0.5, style_weight=10.0,
                          perceptual_max_timestep=1000, seed=1)
    result = train_lora(cfg, progress=False, perceptual=PerceptualLoss(pretrained=False))
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert json.loads(read_lora(tmp_path / "p.safetensors")[1]["stylora.loss_weights"])["lpips"] == 0.5


def test_training_with_perceptual_terms_needs_weights(tiny_model, style_folder, tmp_path, monkeypatch):
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "q.safetensors"),
                          base_model=str(tiny_model["diffusers"]), resolution=64, steps=1, min_images=1,
                          style_weight=1.0)
    with pytest.raises(ValueError, match="style_weight need pretrained feature networks.*vgg19|alexnet"):
        train_lora(cfg, progress=False)


@pytest.mark.parametrize("arch", ["alexnet", "vgg16", "vgg19"])
def test_backbones_match_torchvision_where_installed(arch):
    """Same weights in, same activations out: our torchvision-free definitions load torchvision's state dicts."""
    tv_models = pytest.importorskip("torchvision.models")
    from stylora.eval import backbones

    torch.manual_seed(0)
    reference = getattr(tv_models, arch)(weights=None).eval()
    ours = (backbones.alexnet_features() if arch == "alexnet"
            else backbones.vgg_features(backbones.VGG16_LAYOUT if arch == "vgg16" else backbones.VGG19_LAYOUT))
    backbones.load_features(ours, reference.state_dict())
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.features(x))


def test_metric_weights_come_from_comfyuis_models_folder_and_downloads_are_tried_once(tmp_path, monkeypatch):
    import sys
    import types

    from stylora.eval import weights
    from stylora.nodes.host import register_model_folders

    fp = types.SimpleNamespace(models_dir=str(tmp_path / "models"), folder_names_and_paths={},
                               supported_pt_extensions={".pth", ".safetensors"})
    fp.get_folder_paths = lambda key: fp.folder_names_and_paths[key][0]
    register_model_folders(fp)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setattr(weights, "_FAILED_DOWNLOADS", {})
    monkeypatch.delenv("STYLORA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    folder = tmp_path / "models" / "stylora_metrics"
    assert weights.search_dirs()[0] == folder
    calls = []

    def offline(url, dst, progress=True):
        calls.append(dst)
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for _ in range(3):  # three runs (or three Style Metrics nodes) of one server: one attempt
        with pytest.raises(weights.WeightsUnavailable) as e:
            weights.weights_path(weights.VGG19)
    assert calls == [str(folder / "vgg19-dcbb9e9d.pth")]
    assert str(e.value).splitlines()[0] == "vgg19-dcbb9e9d.pth missing; see README, Style Metrics"
    assert "network unreachable" in str(e.value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vgg19-dcbb9e9d.pth").write_bytes(b"x")  # the user puts the file in the documented folder
    assert weights.weights_path(weights.VGG19) == folder / "vgg19-dcbb9e9d.pth"


def test_lpips_to_style_is_the_mean_lpips_to_each_style_image_at_the_outputs_size(tmp_path, random_nets):
    """Oracle: LPIPS of the output to each style image, scaled to the output's size by PIL directly (the style
    images are exactly twice the output's size, so no crop is involved), averaged over the style images."""
    from stylora.eval.report import EvalConfig, evaluate
    from stylora.eval.scoring import score_images

    dirs = _eval_folders(tmp_path)
    style = tmp_path / "style2x"
    style.mkdir()
    textures = list(skimage_textures().values())[:3]
    for i, arr in enumerate(textures):
        Image.fromarray(arr).resize((192, 128)).save(style / f"t{i}.png")
    cfg = EvalConfig(content=str(dirs["content"]), styled=(str(dirs["soft"]),), out=str(tmp_path / "r"),
                     style=str(style), metrics=("lpips", "lpips_style"))
    rows = {r["image"]: r for r in evaluate(cfg, nets=random_nets, progress=False)["methods"]["soft"]["rows"]}
    lpips = random_nets["lpips"]
    paintings = [_t(np.asarray(Image.open(f).convert("RGB").resize((96, 64), Image.Resampling.LANCZOS)))
                 for f in sorted(style.iterdir())]
    for stem, row in rows.items():
        output = _t(np.asarray(Image.open(dirs["soft"] / f"{stem}.png").convert("RGB")))
        expected = float(np.mean([lpips(output, p).item() for p in paintings]))
        to_photo = lpips(output, _t(np.asarray(Image.open(dirs["content"] / f"{stem}.png").convert("RGB")))).item()
        assert row["lpips_style"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert row["lpips"] == pytest.approx(to_photo, rel=1e-4, abs=1e-6)
        assert abs(expected - to_photo) > 1e-3  # the photo and the style images give different numbers
    # Style Metrics' back end: the same value from the style folder, and from the style images given as a batch.
    output = _t(np.asarray(Image.open(dirs["soft"] / "coffee.png").convert("RGB")))
    content = _t(np.asarray(Image.open(dirs["content"] / "coffee.png").convert("RGB")))
    from_folder = score_images(content, output, style_folder=str(style), metrics=("lpips_style",), nets=random_nets)
    assert from_folder["metrics"]["lpips_style"] == pytest.approx(rows["coffee"]["lpips_style"], rel=1e-4)
    batch = torch.cat([_t(np.asarray(Image.open(f).convert("RGB"))) for f in sorted(style.iterdir())])
    from_images = score_images(content, output, style=batch, metrics=("lpips_style",), nets=random_nets)
    assert from_images["metrics"]["lpips_style"] == pytest.approx(rows["coffee"]["lpips_style"], rel=1e-4)
    no_style = score_images(content, output, metrics=("lpips_style",), nets=random_nets)
    assert "lpips_style" not in no_style["metrics"] and "no style" in no_style["unavailable"]["lpips_style"]


def test_the_style_folder_is_read_recursively_as_training_reads_it(tmp_path, random_nets):
    """The same four paintings, flat or spread over subfolders, give the same LPIPS to the style; with only the
    top level read, the nested folder would give the mean over two of them."""
    from stylora.eval.report import EvalConfig, evaluate

    dirs = _eval_folders(tmp_path)
    nested = tmp_path / "nested"
    (nested / "a" / "b").mkdir(parents=True)
    for i, f in enumerate(sorted(dirs["style"].iterdir())):
        (nested / "a" / "b" if i % 2 else nested).joinpath(f.name).write_bytes(f.read_bytes())

    def lpips_style(style) -> list[float]:
        cfg = EvalConfig(content=str(dirs["content"]), styled=(str(dirs["soft"]),), out=str(tmp_path / style.name),
                         style=str(style), metrics=("lpips_style",))
        return [r["lpips_style"] for r in evaluate(cfg, nets=random_nets, progress=False)["methods"]["soft"]["rows"]]

    flat = lpips_style(dirs["style"])
    assert all(isinstance(v, float) for v in flat) and lpips_style(nested) == pytest.approx(flat, rel=1e-6)
