"""The feature networks against plain reference implementations written here from the papers and the reference
code's definitions (torchvision's AlexNet/VGG, lpips 0.1.4, pytorch-fid's FID Inception-v3), on fixed random
weights: the reference packages cannot be installed next to this project, so their formulas are the oracle.

Each reference takes only the weight tensors from the module under test and redoes everything else (layer order,
strides, paddings, taps, input scaling, normalisation, pooling) by itself. Tolerances: float32 with the same
operations in a different arrangement, so relative 1e-5 (1e-4 through Inception's 94 convolutions).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stylora.eval.metrics import LPIPS, InceptionFeatures, VGGStyle, fid, kid
from torch import nn

# lpips 0.1.4 ScalingLayer: inputs in -1..1 shifted and scaled to the ImageNet-normalised range.
LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _convs(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight, m.bias) for m in module.modules() if isinstance(m, nn.Conv2d)]


def _images(seed: int, n: int = 2, h: int = 67, w: int = 83) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches in 0..1: smooth random images and a perturbed copy (odd sizes test the pooling arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    a = F.interpolate(torch.rand(n, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    b = (a + 0.15 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)
    return a, b


# --- AlexNet and VGG as torchvision defines them, returning the named ReLU outputs ----------------------------

def alexnet_relus(x: torch.Tensor, convs) -> list[torch.Tensor]:
    """relu1..relu5 of torchvision's AlexNet (Krizhevsky 2014 one-GPU variant)."""
    (w1, b1), (w2, b2), (w3, b3), (w4, b4), (w5, b5) = convs
    r1 = F.relu(F.conv2d(x, w1, b1, stride=4, padding=2))
    r2 = F.relu(F.conv2d(F.max_pool2d(r1, 3, 2), w2, b2, padding=2))
    r3 = F.relu(F.conv2d(F.max_pool2d(r2, 3, 2), w3, b3, padding=1))
    r4 = F.relu(F.conv2d(r3, w4, b4, padding=1))
    r5 = F.relu(F.conv2d(r4, w5, b5, padding=1))
    return [r1, r2, r3, r4, r5]


def vgg_relus(x: torch.Tensor, convs, blocks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Every relu{block}_{i} of a torchvision VGG without batch norm (Simonyan & Zisserman 2015): 3x3 convs
    with padding 1, a 2x2 max pool after each block."""
    out, it, h = {}, iter(convs), x
    for block, n in enumerate(blocks, 1):
        if block > 1:
            h = F.max_pool2d(h, 2, 2)
        for i in range(1, n + 1):
            w, b = next(it)
            h = out[f"relu{block}_{i}"] = F.relu(F.conv2d(h, w, b, padding=1))
    return out


def lpips_reference(x: torch.Tensor, y: torch.Tensor, net: str, convs, lins) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018): images in 0..1 -> 2x-1 -> ScalingLayer -> five ReLU taps, each unit-
    normalised over channels (eps 1e-10 added to the norm), squared difference, 1x1 linear layer, spatial mean,
    summed over the taps. Taps: AlexNet relu1..relu5; VGG-16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    def taps(img):
        h = (img * 2 - 1 - LPIPS_SHIFT) / LPIPS_SCALE
        if net == "alex":
            return alexnet_relus(h, convs)
        r = vgg_relus(h, convs, (2, 2, 3, 3, 3))
        return [r["relu1_2"], r["relu2_2"], r["relu3_3"], r["relu4_3"], r["relu5_3"]]

    total = torch.zeros(x.shape[0])
    for fx, fy, w in zip(taps(x), taps(y), lins):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += F.conv2d((nx - ny) ** 2, w).mean(dim=(1, 2, 3))
    return total


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_reference_formula_including_its_input_scaling(net):
    model = LPIPS(net, pretrained=False, seed=3)
    x, y = _images(0)
    with torch.no_grad():
        ours = model(x, y)
        # Fed -1..1 instead of 0..1 (the scaling skipped), the reference gives another number: the test sees it.
        convs, lins = _convs(model.features), [c.weight for c in model.lins]
        unscaled = lpips_reference((x + 1) / 2, (y + 1) / 2, net, convs, lins)
        expected = lpips_reference(x, y, net, convs, lins)
        # ComfyUI's layout [B, H, W, C] is the same images.
        channels_last = model(x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1))
    assert ours.shape == (2,) and (ours > 0).all()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(channels_last, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(unscaled, expected, rtol=1e-2)
    assert model(x, x).abs().max() < 1e-7


def test_vgg_content_and_gram_losses_equal_the_reference_formulas():
    """Gatys et al. (2016) on VGG-19: style layers relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, Gram matrices
    F F^T / (C H W), style loss = sum over layers of the mean squared Gram difference; content loss = MSE of
    relu4_2. Inputs ImageNet-normalised."""
    vgg = VGGStyle(pretrained=False, seed=5)
    x, c = _images(1)
    style = _images(2, n=1, h=45, w=52)[0]  # another size: Gram matrices do not depend on it
    convs = _convs(vgg.features)

    def relus(img):
        return vgg_relus((img - IMAGENET_MEAN) / IMAGENET_STD, convs, (2, 2, 4, 4, 1))

    def gram(f):
        b, ch, h, w = f.shape
        flat = f.reshape(b, ch, h * w)
        return flat @ flat.transpose(1, 2) / (ch * h * w)

    with torch.no_grad():
        rx, rc, rs = relus(x), relus(c), relus(style)
        style_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
        expected_gram = sum(((gram(rx[n]) - gram(rs[n])) ** 2).mean(dim=(1, 2)) for n in style_layers)
        expected_content = ((rx["relu4_2"] - rc["relu4_2"]) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(vgg.gram_loss(x, style), expected_gram, rtol=1e-5, atol=0)
        torch.testing.assert_close(vgg.content_loss(x, c), expected_content, rtol=1e-5, atol=0)
        assert (expected_gram > 0).all() and (expected_content > 0).all()


# --- FID Inception-v3 as pytorch-fid defines it (TF's 2015-12-05 graph) --------------------------------------

def _bc(x, sd, name, stride=1, padding=0):
    """BasicConv2d: convolution without bias, batch norm with eps 0.001 (TF's), ReLU."""
    h = F.conv2d(x, sd[f"{name}.conv.weight"], None, stride=stride, padding=padding)
    h = F.batch_norm(h, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                     sd[f"{name}.bn.bias"], training=False, eps=0.001)
    return F.relu(h)


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF's pool ignores the padding


def inception_reference(images: torch.Tensor, sd: dict) -> torch.Tensor:
    """pytorch-fid's FID Inception-v3 pool3 features [B, 2048] of images in 0..1."""
    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = _bc(x, sd, "Conv2d_1a_3x3", stride=2)
    x = _bc(x, sd, "Conv2d_2a_3x3")
    x = F.max_pool2d(_bc(x, sd, "Conv2d_2b_3x3", padding=1), 3, 2)
    x = F.max_pool2d(_bc(_bc(x, sd, "Conv2d_3b_1x1"), sd, "Conv2d_4a_3x3"), 3, 2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):  # FIDInceptionA
        x = torch.cat([_bc(x, sd, f"{m}.branch1x1"),
                       _bc(_bc(x, sd, f"{m}.branch5x5_1"), sd, f"{m}.branch5x5_2", padding=2),
                       _bc(_bc(_bc(x, sd, f"{m}.branch3x3dbl_1"), sd, f"{m}.branch3x3dbl_2", padding=1), sd,
                           f"{m}.branch3x3dbl_3", padding=1),
                       _bc(_avg(x), sd, f"{m}.branch_pool")], 1)
    m = "Mixed_6a"  # InceptionB
    x = torch.cat([_bc(x, sd, f"{m}.branch3x3", stride=2),
                   _bc(_bc(_bc(x, sd, f"{m}.branch3x3dbl_1"), sd, f"{m}.branch3x3dbl_2", padding=1), sd,
                       f"{m}.branch3x3dbl_3", stride=2),
                   F.max_pool2d(x, 3, 2)], 1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):  # FIDInceptionC
        b7 = _bc(_bc(_bc(x, sd, f"{m}.branch7x7_1"), sd, f"{m}.branch7x7_2", padding=(0, 3)), sd,
                 f"{m}.branch7x7_3", padding=(3, 0))
        d = _bc(x, sd, f"{m}.branch7x7dbl_1")
        for i, pad in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
            d = _bc(d, sd, f"{m}.branch7x7dbl_{i}", padding=pad)
        x = torch.cat([_bc(x, sd, f"{m}.branch1x1"), b7, d, _bc(_avg(x), sd, f"{m}.branch_pool")], 1)
    m = "Mixed_7a"  # InceptionD
    b7 = _bc(_bc(_bc(x, sd, f"{m}.branch7x7x3_1"), sd, f"{m}.branch7x7x3_2", padding=(0, 3)), sd,
             f"{m}.branch7x7x3_3", padding=(3, 0))
    x = torch.cat([_bc(_bc(x, sd, f"{m}.branch3x3_1"), sd, f"{m}.branch3x3_2", stride=2),
                   _bc(b7, sd, f"{m}.branch7x7x3_4", stride=2), F.max_pool2d(x, 3, 2)], 1)
    for m, pool in (("Mixed_7b", _avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):  # FIDInceptionE_1, _2
        b3 = _bc(x, sd, f"{m}.branch3x3_1")
        b3 = torch.cat([_bc(b3, sd, f"{m}.branch3x3_2a", padding=(0, 1)),
                        _bc(b3, sd, f"{m}.branch3x3_2b", padding=(1, 0))], 1)
        d = _bc(_bc(x, sd, f"{m}.branch3x3dbl_1"), sd, f"{m}.branch3x3dbl_2", padding=1)
        d = torch.cat([_bc(d, sd, f"{m}.branch3x3dbl_3a", padding=(0, 1)),
                       _bc(d, sd, f"{m}.branch3x3dbl_3b", padding=(1, 0))], 1)
        x = torch.cat([_bc(x, sd, f"{m}.branch1x1"), b3, d, _bc(pool(x), sd, f"{m}.branch_pool")], 1)
    return x.mean(dim=(2, 3))


def test_inception_pool_features_equal_pytorch_fids_definition():
    net = InceptionFeatures(pretrained=False, seed=7)
    g = torch.Generator().manual_seed(8)
    for m in net.net.modules():  # random batch-norm statistics too, so that eps and their use are checked
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    images = _images(9, h=61, w=97)[0]
    with torch.no_grad():
        expected = inception_reference(images, net.net.state_dict()).double()
    ours = net(images)
    assert ours.shape == (2, 2048) and ours.dtype == torch.float64 and expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


# --- FID and KID on values worked out by hand -------------------------------------------------------------

def test_fid_and_kid_on_values_worked_out_by_hand():
    # 1-D: means 1 and 3, unbiased variances 2 and 8: (1-3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 6.
    assert fid(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0, abs=1e-9)
    # Independent dimensions add up: the second dimension's sets are equal (0 more).
    assert fid(np.array([[0.0, 4.0], [2.0, 7.0]]), np.array([[1.0, 4.0], [5.0, 7.0]])) == pytest.approx(6.0, abs=1e-9)
    # KID, d = 1, k(a, b) = (a b + 1)^3: x = {0, 1}, y = {1, 2}. Within x: k(0,1) = 1; within y: k(1,2) = 27;
    # across: (1 + 1 + 8 + 27) / 4 = 9.25. Unbiased MMD^2 = 1 + 27 - 2 * 9.25 = 9.5.
    mean, std = kid(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]]), subsets=4, subset_size=2)
    assert mean == pytest.approx(9.5, abs=1e-9) and std == pytest.approx(0.0, abs=1e-12)


# --- input layouts and ranges, the published weights' loading, the random stand-ins --------------------------

def test_as_bchw_reads_every_layout_and_only_values_in_0_1():
    from stylora.eval.metrics import as_bchw

    g = torch.Generator().manual_seed(3)
    rgb = torch.rand(2, 3, 5, 7, generator=g)
    hwc = rgb.permute(0, 2, 3, 1)
    assert torch.equal(as_bchw(hwc[0]), rgb[:1])  # one ComfyUI image without its batch dimension
    assert torch.equal(as_bchw(rgb[0]), rgb[:1])  # one torch image
    rgba = torch.cat([hwc, torch.full((2, 5, 7, 1), 0.5)], -1)
    assert torch.equal(as_bchw(rgba), rgb)  # the alpha channel is dropped
    assert torch.equal(as_bchw(rgb[:, :1]), rgb[:, :1].expand(-1, 3, -1, -1))  # grey: the one channel thrice
    with pytest.raises(ValueError, match="1 or 3 colour channels"):
        as_bchw(torch.rand(1, 2, 8, 8))
    # 1e-3 of rounding either side of 0..1 is clamped; more is refused.
    edge = torch.tensor([-0.0009, 0.0, 1.0, 1.0009]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert as_bchw(edge)[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    for bad in (-0.002, 1.002):
        with pytest.raises(ValueError, match="values must be in 0..1"):
            as_bchw(torch.full((1, 3, 2, 2), bad))


def test_lpips_refuses_images_of_different_sizes():
    lpips = LPIPS("alex", pretrained=False)
    with pytest.raises(ValueError, match="x is 40x32 but y is 41x32"):
        lpips(torch.rand(1, 3, 32, 40), torch.rand(1, 3, 32, 41))


def test_random_stand_in_networks_are_seeded_and_their_lpips_heads_are_small():
    """pretrained=False: the same weights for the same seed (tests compare runs), other weights for another seed;
    the LPIPS heads uniform in [0, 1/C), so the random distance stays of the order of the published one."""
    a, b, c = (LPIPS("alex", pretrained=False, seed=s) for s in (0, 0, 1))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    for conv, channels in zip(a.lins, LPIPS.CHANNELS["alex"]):
        w = conv.weight
        assert w.min() >= 0 and w.max() < 1 / channels and w.mean() > 0.3 / channels, channels


def test_published_weights_are_loaded_layer_by_layer_and_strictly(monkeypatch):
    """The published files hold whole torchvision networks (features.N.* and classifier.*) and LPIPS' heads
    (linI.model.1.weight): each module takes the features up to its last tap, exactly those tensors, and refuses a
    file that lacks one; its state is those weights only (the input normalisation is fixed, not a weight)."""
    from stylora.eval import backbones, metrics, weights

    g = torch.Generator().manual_seed(4)

    def published(layers: nn.Sequential) -> dict[str, torch.Tensor]:
        state = {f"features.{k}": torch.randn(v.shape, generator=g) for k, v in layers.state_dict().items()}
        state.update({"classifier.1.weight": torch.randn(8, 4, generator=g), "classifier.1.bias": torch.zeros(8)})
        return state

    files = {weights.ALEXNET.name: published(backbones.alexnet_features()),
             weights.VGG19.name: published(backbones.vgg_features(backbones.VGG19_LAYOUT)),
             weights.LPIPS_LINEAR["alex"].name: {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
                                                 for i, c in enumerate(LPIPS.CHANNELS["alex"])}}
    monkeypatch.setattr(metrics, "load_state_dict", lambda spec: dict(files[spec.name]))
    lpips, vgg = LPIPS("alex", pretrained=True), VGGStyle(pretrained=True)
    for module, source, last in ((lpips, weights.ALEXNET.name, 11), (vgg, weights.VGG19.name, 29)):
        state = module.features.state_dict()
        expected = {k[len("features."):]: v for k, v in files[source].items()
                    if k.startswith("features.") and int(k.split(".")[1]) <= last}
        assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
        assert all(k.startswith(("features.", "lins.")) for k in module.state_dict()), sorted(module.state_dict())
    for i, conv in enumerate(lpips.lins):
        assert torch.equal(conv.weight, files[weights.LPIPS_LINEAR["alex"].name][f"lin{i}.model.1.weight"])
    del files[weights.VGG19.name]["features.28.bias"]  # relu5_1's convolution, the last one VGGStyle keeps
    with pytest.raises(RuntimeError, match="features.28.bias|28.bias"):
        VGGStyle(pretrained=True)


def test_kid_averages_100_random_subsets_by_default():
    """Binkowski et al.'s KID estimate: the unbiased MMD^2 of the cubic kernel averaged over subsets drawn without
    replacement; 100 subsets unless told. The reference draws the same subsets (numpy's generator, seed 0, x then
    y) and computes each MMD^2 with explicit sums over pairs."""
    rng = np.random.default_rng(7)
    f1, f2 = rng.normal(0, 1, (9, 2)), rng.normal(0.5, 1, (8, 2))
    m, d = 4, 2

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    draw, values = np.random.default_rng(0), []
    for _ in range(100):
        x, y = f1[draw.choice(9, m, replace=False)], f2[draw.choice(8, m, replace=False)]
        within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        values.append(within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    mean, std = kid(f1, f2, subset_size=m)
    assert mean == pytest.approx(np.mean(values), rel=1e-9) and std == pytest.approx(np.std(values), rel=1e-9)
    assert std > 0
