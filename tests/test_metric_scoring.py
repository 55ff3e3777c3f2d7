"""The metric registry and its one scorer, as the Style Metrics node, `stylora eval` and the study use them.

Stand-in networks with formulas simple enough to work out by hand (mean absolute difference for LPIPS, mean squared
difference for the content loss, the mean colour as the "Gram matrix", the mean colour and its square as the
Inception features) pin the scorer's wiring: which network and which target each metric gets, means, reasons, the
set metrics and the report files. The real networks are pinned against reference formulas in
test_feature_networks.py.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from stylora.eval import registry
from stylora.eval.registry import ALL_METRICS, METRICS, PAIR_METRICS, SET_METRICS, STUDY_METRICS, PairInputs, SetInputs
from test_study_report import drawn  # noqa: F401, F811  (the fixture that records what the reports draw)


class MeanAbs(torch.nn.Module):
    """LPIPS stand-in: mean |x - y| per image, times `scale` (tells two LPIPS networks apart)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3)) * self.scale


class MeanColourVGG(torch.nn.Module):
    """VGGStyle stand-in: content loss = mean squared difference; "Gram matrices" = [the mean colour [N, 3, 1]];
    Gram loss = squared distance of the mean colours."""

    def content_loss(self, x, y):
        return ((x - y) ** 2).mean(dim=(1, 2, 3))

    def grams(self, images):
        return [images.mean(dim=(2, 3)).unsqueeze(-1)]

    def gram_loss(self, x, style):
        return ((self.grams(x)[0] - style[0]) ** 2).sum(dim=(1, 2))


class ColourFeatures(torch.nn.Module):
    """Inception stand-in: features [mean R, mean G, mean B] per image."""

    def forward(self, images):
        return images.mean(dim=(2, 3)).detach().cpu()


def fake_nets() -> dict:
    return {"lpips": MeanAbs(), "lpips_vgg": MeanAbs(10.0), "vgg": MeanColourVGG(), "inception": ColourFeatures()}


def flat(value: float, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.full((1, 3, h, w), value)


def fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two Gaussians (Heusel et al. 2017) with numpy's eigenvalues (both covariances are
    symmetric positive semi-definite, so sqrt(S1 S2) has the eigenvalues sqrt(eig(S1 S2)))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def kid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over whole sets of equal size (Binkowski et al. 2018)."""
    d, m = a.shape[1], len(a)
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(a, a), k(b, b)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * k(a, b).mean())


# --- the registry -----------------------------------------------------------------------------------------------

def test_the_registry_lists_each_metric_once_with_what_the_tables_need():
    assert ALL_METRICS == ("ssim", "lpips", "lpips_vgg", "content", "lpips_style", "gram", "fid", "kid", "artfid")
    assert PAIR_METRICS == ALL_METRICS[:6] and SET_METRICS == ("fid", "kid", "artfid")
    assert STUDY_METRICS == ("ssim", "lpips", "content", "lpips_style", "gram", "fid", "kid", "artfid")
    assert [m.name for m in METRICS if m.higher_is_better] == ["ssim"]
    assert {m.name for m in METRICS if m.target == registry.CONTENT} == {"ssim", "lpips", "lpips_vgg", "content"}
    assert registry.BY_NAME["artfid"].networks == ("lpips", "inception")
    assert all(m.description and m.reference and m.label for m in METRICS)
    assert set(registry.NETWORKS) == {n for m in METRICS for n in m.networks}
    assert registry.arrow("ssim") == "↑" and registry.arrow("fid") == "↓"
    registry.check_names(("ssim", "fid"), "metrics")
    with pytest.raises(ValueError, match=r"--metrics: unknown \['bogus'\]; choose from \['ssim'"):
        registry.check_names(("ssim", "bogus"), "--metrics")
    assert (registry.KID_SUBSETS, registry.KID_SUBSET_SIZE) == (100, 1000)


def test_the_node_eval_and_study_take_their_metric_names_from_the_registry():
    from stylora.eval.config import EvalConfig
    from stylora.nodes.metrics import METRIC_CHOICES
    from stylora.study import report as study_report
    from stylora.study.config import StudyConfig

    assert METRIC_CHOICES == ALL_METRICS and "lpips_vgg" in METRIC_CHOICES
    assert EvalConfig.__dataclass_fields__["metrics"].default == ALL_METRICS
    assert EvalConfig.__dataclass_fields__["kid_subsets"].default == 100
    assert EvalConfig.__dataclass_fields__["kid_subset_size"].default == 1000
    assert StudyConfig.__dataclass_fields__["metrics"].default == STUDY_METRICS
    assert study_report.METRICS == STUDY_METRICS
    assert [study_report.HEADERS[m] for m in STUDY_METRICS] == [
        "SSIM ↑", "LPIPS ↓", "content ↓", "LPIPS to style ↓", "Gram ↓", "FID ↓", "KID ↓", "ArtFID ↓"]
    with pytest.raises(ValueError, match="metrics: unknown"):
        EvalConfig(content="c", styled=("s",), out="o", metrics=("nope",))


def test_load_nets_builds_only_what_the_wanted_metrics_need_and_names_missing_weights(monkeypatch):
    from stylora.eval.scoring import load_nets
    from stylora.eval.weights import WeightsUnavailable

    built = []

    def builder(name):
        def build():
            built.append(name)
            if name == "inception":
                raise WeightsUnavailable("pt_inception missing")
            return name
        return build

    monkeypatch.setattr(registry, "NETWORKS", {n: builder(n) for n in registry.NETWORKS})
    monkeypatch.setattr("stylora.eval.scoring.NETWORKS", registry.NETWORKS)
    nets, unavailable = load_nets({"ssim", "content"})
    assert built == ["vgg"] and nets == {"vgg": "vgg"} and unavailable == {}
    nets, unavailable = load_nets({"lpips", "artfid", "kid"}, {"lpips": "given"})
    assert built == ["vgg", "inception"] and nets == {"lpips": "given"}
    assert unavailable == {"artfid": "pt_inception missing", "kid": "pt_inception missing"}


# --- the scorer -------------------------------------------------------------------------------------------------

def test_score_pairs_gives_each_metric_its_network_and_target():
    from stylora.eval.scoring import StyleSet, score_pairs

    styled = torch.cat([flat(0.5), flat(0.2)])
    content = torch.cat([flat(0.5), flat(0.6)])
    painting = Image.new("RGB", (40, 20), (255, 0, 0))
    grams = [torch.tensor([[[1.0], [0.0], [0.0]]])]
    inputs = PairInputs(styled, fake_nets(), content, StyleSet([painting]), grams)
    values, problems = score_pairs(inputs, set(ALL_METRICS))
    assert problems == {} and list(values) == list(PAIR_METRICS)
    assert values["ssim"][0] == pytest.approx(1.0) and values["ssim"][1] < 1
    assert values["lpips"] == pytest.approx([0.0, 0.4])
    assert values["lpips_vgg"] == pytest.approx([0.0, 4.0])
    assert values["content"] == pytest.approx([0.0, 0.16])
    # to the red painting: |0.5 - 1| + 0.5 + 0.5 over 3 channels; |0.2 - 1| + 0.2 + 0.2
    assert values["lpips_style"] == pytest.approx([0.5, 0.4])
    assert values["gram"] == pytest.approx([0.25 + 0.25 + 0.25, 0.64 + 0.04 + 0.04])
    # Only what is wanted, whose network is loaded and whose target is given.
    nets = {k: v for k, v in fake_nets().items() if k != "lpips_vgg"}
    values, _ = score_pairs(PairInputs(styled, nets, None, None, grams), {"ssim", "lpips_vgg", "gram", "content"})
    assert list(values) == ["gram"]


def test_a_pair_too_small_for_one_metric_still_gets_its_other_scores_with_the_reason():
    from stylora.eval.scoring import score_images, score_pairs

    tiny = flat(0.5, 7, 7)
    values, problems = score_pairs(PairInputs(tiny, fake_nets(), flat(0.25, 7, 7)), {"ssim", "lpips", "content"})
    assert set(problems) == {"ssim"} and "7" in problems["ssim"] and "\n" not in problems["ssim"]
    assert values == {"lpips": pytest.approx([0.25]), "content": pytest.approx([0.0625])}
    out = score_images(flat(0.25, 7, 7), tiny, metrics=("ssim", "lpips"), nets=fake_nets())
    assert out["metrics"] == {"lpips": pytest.approx(0.25)} and "ssim" in out["unavailable"]


def test_score_set_values_and_reasons_are_the_reference_formulas():
    from stylora.eval.scoring import score_set

    a = np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.4], [0.5, 0.3]])
    b = np.array([[0.6, 0.5], [0.8, 0.7], [0.7, 0.9], [0.9, 0.6]])
    values, problems = score_set(SetInputs(a, b, {"lpips": 0.5}, kid_subsets=3, kid_subset_size=50),
                                 set(SET_METRICS))
    assert problems == {}
    assert values["fid"] == pytest.approx(fid_by_hand(a, b), rel=1e-6)
    assert values["kid"] == pytest.approx(kid_by_hand(a, b), rel=1e-9) and values["kid_std"] == pytest.approx(0)
    assert values["artfid"] == pytest.approx(1.5 * (1 + fid_by_hand(a, b)), rel=1e-6)
    # ArtFID alone still reports the FID it is made of; without the mean LPIPS it says why.
    values, problems = score_set(SetInputs(a, b, {}), {"artfid", "fid"})
    assert set(values) == {"fid"} and "mean LPIPS" in problems["artfid"]
    values, problems = score_set(SetInputs(a, b, {"lpips": 0.0}), {"artfid"})
    assert values == {"artfid": pytest.approx(1 + fid_by_hand(a, b), rel=1e-6),
                      "fid": pytest.approx(fid_by_hand(a, b), rel=1e-6)}
    # Two on each side is enough; one is not, on either side.
    assert score_set(SetInputs(a[:2], b[:2], {}), {"kid"})[1] == {}
    for x, y, got in ((a[:1], b, "got 1 and 4"), (a, b[:1], "got 4 and 1")):
        values, problems = score_set(SetInputs(x, y, {"lpips": 0.1}), {"fid", "kid"})
        assert values == {} and set(problems) == {"fid", "kid"}
        assert problems["kid"] == f"needs at least 2 styled images and 2 style images ({got})"


def _folder(path, colours, size=(16, 16)):
    path.mkdir()
    for i, c in enumerate(colours):
        Image.new("RGB", size, c).save(path / f"p{i}.png")
    return path


def test_score_images_with_a_style_folder_scores_every_metric(tmp_path):
    from stylora.eval.scoring import format_scores, score_images

    style = _folder(tmp_path / "style", [(255, 0, 0), (0, 0, 255)])
    styled = torch.cat([flat(0.5), flat(0.25)]).permute(0, 2, 3, 1)  # ComfyUI layout [B, H, W, 3]
    content = flat(0.5).permute(0, 2, 3, 1)  # one content image for the batch
    out = score_images(content, styled, style_folder=str(style), nets=fake_nets(), style_max_side=8)
    assert out["images"] == 2 and out["unavailable"] == {} and out["nonfinite_pixels"] == [0, 0]
    m = out["metrics"]
    assert m["lpips"] == pytest.approx(0.125) and m["lpips_vgg"] == pytest.approx(1.25)
    assert m["content"] == pytest.approx(0.0625 / 2)
    # LPIPS to the style: mean over both paintings of mean |x - painting|.
    assert out["per_image"]["lpips_style"] == pytest.approx([0.5, (0.75 + 0.25 + 0.25 + 0.25 + 0.25 + 0.75) / 6])
    # Gram loss to the mean colour of the paintings (0.5, 0, 0.5).
    assert out["per_image"]["gram"] == pytest.approx([0.25, 0.0625 + 0.0625 + 0.0625])
    feats = np.array([[0.5] * 3, [0.25] * 3])
    style_feats = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    assert m["fid"] == pytest.approx(fid_by_hand(feats, style_feats), rel=1e-5, abs=1e-7)
    assert m["kid"] == pytest.approx(kid_by_hand(feats, style_feats), rel=1e-5)
    assert m["artfid"] == pytest.approx((1 + 0.125) * (1 + m["fid"]), rel=1e-6)
    text = format_scores(out).splitlines()
    assert text[0] == "2 image(s)" and text[1].startswith("ssim: 0.") and text[1].endswith(
        "  (SSIM to the content photo (structure kept); higher is better)")
    assert text[2].startswith("lpips: 0.125  (LPIPS (AlexNet) to the content photo; lower is better)")
    assert len(text) == 10


def test_score_images_with_style_images_and_without_a_style(tmp_path):
    from stylora.eval.scoring import score_images

    red_blue = torch.stack([torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)])
    red_blue[0, 0], red_blue[1, 2] = 1.0, 1.0
    out = score_images(flat(0.5), flat(0.5), style=red_blue, nets=fake_nets())
    assert out["per_image"]["gram"] == pytest.approx([0.25])  # to the mean colour (.5, 0, .5)
    assert out["per_image"]["lpips_style"] == pytest.approx([0.5])
    assert out["unavailable"] == {m: "no style folder given" for m in SET_METRICS}
    out = score_images(flat(0.5), flat(0.5), style=red_blue[:1], nets=fake_nets())
    assert out["per_image"]["gram"] == pytest.approx([0.25 + 0.25 + 0.25])
    out = score_images(flat(0.5), flat(0.5), nets=fake_nets(), metrics=("gram", "lpips_style", "fid", "ssim"))
    assert out["unavailable"] == {"gram": "no style image or style folder given",
                                  "lpips_style": "no style image or style folder given", "fid": "no style folder given"}
    assert set(out["metrics"]) == {"ssim"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="style_folder .*empty: no images in it"):
        score_images(flat(0.5), flat(0.5), style_folder=str(empty), nets=fake_nets())


def test_one_styled_image_gets_its_pair_scores_and_the_set_metrics_reason(tmp_path):
    from stylora.eval.scoring import format_scores, score_images

    style = _folder(tmp_path / "style", [(255, 0, 0), (0, 0, 255)])
    out = score_images(flat(0.5), flat(0.5), style_folder=str(style), nets=fake_nets())
    why = "needs at least 2 styled images and 2 style images (got 1 and 2)"
    assert out["unavailable"] == {"fid": why, "kid": why, "artfid": why}
    assert set(out["metrics"]) == set(PAIR_METRICS)
    assert format_scores(out).splitlines()[-3:] == [f"{m}: n/a ({why})" for m in SET_METRICS]


def test_style_metrics_node_scores_every_registry_metric_including_lpips_vgg(tmp_path, monkeypatch):
    from stylora.nodes import metrics as node_module

    monkeypatch.setattr(node_module, "load_nets", lambda wanted: (fake_nets(), {}))
    node = node_module.StyleMetrics()
    style = _folder(tmp_path / "style", [(255, 0, 0), (0, 0, 255)])
    styled = torch.cat([flat(0.5), flat(0.25)]).permute(0, 2, 3, 1)
    out = node.measure(flat(0.5).permute(0, 2, 3, 1), styled, style_folder=f" {style} ",
                       csv_path=str(tmp_path / "m.csv"), label="mine")
    scores = json.loads(out["result"][1])
    assert set(scores["metrics"]) == set(ALL_METRICS) and scores["unavailable"] == {}
    assert scores["metrics"]["lpips_vgg"] == pytest.approx(1.25)
    assert out["ui"]["text"] == [out["result"][0]] and out["ui"]["stylora_metrics"][0]["images"] == 2
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert rows[0]["label"] == "mine" and rows[0]["images"] == "2" and float(rows[0]["lpips"]) == pytest.approx(0.125)
    assert node_module.StyleMetrics.IS_CHANGED(style_folder="") == ""
    assert node_module.StyleMetrics.IS_CHANGED(style_folder=" x ") != ""
    assert node_module.torch_device().type in ("cpu", "cuda")
    out = node.measure(flat(0.5).permute(0, 2, 3, 1), styled, csv_path=" ")
    assert not (tmp_path / " ").exists() and "fid" in json.loads(out["result"][1])["unavailable"]


def test_style_metrics_node_keeps_the_networks_missing_weights_as_unavailable(monkeypatch):
    from stylora.nodes import metrics as node_module

    calls = []
    nets = {k: v for k, v in fake_nets().items() if k != "lpips_vgg"}
    monkeypatch.setattr(node_module, "load_nets", lambda wanted: calls.append(wanted) or (
        nets, {"lpips_vgg": "vgg16-397923af.pth missing"}))
    node = node_module.StyleMetrics()
    for _ in range(2):
        text = node.measure(flat(0.5), flat(0.25))["result"][0]
    assert calls == [set(ALL_METRICS)]  # looked up once per node
    assert "lpips_vgg: n/a (vgg16-397923af.pth missing)" in text.splitlines()


# --- stylora eval -----------------------------------------------------------------------------------------------

def _eval_dirs(tmp_path):
    content = _folder(tmp_path / "content", [(128, 128, 128)] * 3)
    styled = _folder(tmp_path / "styled", [(128, 128, 128), (64, 64, 64), (0, 0, 0)])
    style = _folder(tmp_path / "style", [(255, 0, 0), (0, 0, 255)])
    return content, styled, style


def test_evaluate_report_values_are_the_hand_computed_ones(tmp_path):
    from stylora.eval.report import EvalConfig, evaluate

    content, styled, style = _eval_dirs(tmp_path)
    Image.new("RGB", (16, 16), (10, 10, 10)).save(styled / "lonely.png")  # no content twin
    cfg = EvalConfig(content=str(content), styled=(str(styled), str(styled)), out=str(tmp_path / "r"),
                     style=str(style), style_max_side=32, kid_subsets=2, grid_rows=2,
                     cache_dir=str(tmp_path / "cache"))
    report = evaluate(cfg, nets=fake_nets(), progress=False)
    assert list(report["methods"]) == ["styled", "styled-2"] and report["unavailable"] == {}
    method = json.loads((tmp_path / "r" / "report.json").read_text())["methods"]["styled"]
    g = np.array([128, 64, 0]) / 255
    c = 128 / 255
    assert method["images"] == 3 and method["unmatched"] == ["lonely"]
    assert method["mean"]["lpips"] == pytest.approx(np.mean(abs(g - c)), rel=1e-5)
    assert method["mean"]["lpips_vgg"] == pytest.approx(10 * np.mean(abs(g - c)), rel=1e-5)
    assert method["mean"]["content"] == pytest.approx(np.mean((g - c) ** 2), rel=1e-5)
    assert method["mean"]["gram"] == pytest.approx(np.mean((g - .5) ** 2 * 2 + g ** 2), rel=1e-5)
    assert method["mean"]["ssim"] < 1 and method["rows"][0]["ssim"] == pytest.approx(1.0)
    feats = np.repeat(g[:, None], 3, axis=1)
    style_feats = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    fid = fid_by_hand(feats, style_feats)
    assert method["set"]["fid"] == pytest.approx(fid, rel=1e-5, abs=1e-7)
    assert method["set"]["artfid"] == pytest.approx((1 + method["mean"]["lpips"]) * (1 + fid), rel=1e-5)
    assert set(method["set"]) == {"fid", "kid", "kid_std", "artfid"}
    rows = list(csv.DictReader(open(tmp_path / "r" / "report.csv")))
    assert len(rows) == 6 and float(rows[1]["content"]) == pytest.approx((64 / 255 - c) ** 2, rel=1e-5)
    md = (tmp_path / "r" / "report.md").read_text()
    assert ("| method | images | ssim ↑ | lpips ↓ | lpips_vgg ↓ | content ↓ | lpips_style ↓ | gram ↓ | fid ↓ | "
            "kid ↓ | artfid ↓ |") in md
    assert f"| styled | 3 | {method['mean']['ssim']:.4g} | {method['mean']['lpips']:.4g} |" in md
    assert "- styled/lonely: no content photo named lonely.*" in md and "images (see the rows below)" not in md
    kid, kid_std = method["set"]["kid"], method["set"]["kid_std"]
    assert f"| {fid:.4g} | {kid:.4g} ± {kid_std:.4g} | {method['set']['artfid']:.4g} |" in md
    assert "## Unavailable metrics" not in md
    cfg = EvalConfig(content=str(content), styled=(str(styled),), out=str(tmp_path / "r2"), metrics=("ssim", "gram"))
    evaluate(cfg, nets=fake_nets(), progress=False)
    md = (tmp_path / "r2" / "report.md").read_text().splitlines()
    assert md[md.index("## Unavailable metrics") + 2] == "- **gram**: no --style folder given"
    with Image.open(tmp_path / "r" / "grid.png") as grid:
        assert grid.size == (4 * 192, 20 + 2 * 192)
        assert grid.getpixel((192 + 96, 20 + 96)) == (255, 0, 0)  # the first style image
        assert grid.getpixel((2 * 192 + 96, 20 + 192 + 96)) == (64, 64, 64)  # the second output
    for png in ("plot_ssim.png", "plot_fid.png", "plot_content_vs_style.png"):
        assert (tmp_path / "r" / png).is_file()


def test_eval_terminal_table_says_why_a_cell_is_na_or_a_partial_mean(tmp_path, capsys, monkeypatch):
    from stylora.cli import main

    monkeypatch.setattr("stylora.eval.report.load_nets", lambda wanted, nets=None: (fake_nets(), {}))
    content, styled, style = _eval_dirs(tmp_path)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(content / "tiny.png")
    Image.new("RGB", (8, 8), (3, 2, 1)).save(styled / "tiny.png")  # too small for SSIM's 11x11 window
    one = _folder(tmp_path / "one", [(128, 128, 128)])
    code = main(["eval", "--content", str(content), "--styled", str(styled), str(one), "--style", str(style),
                 "--metrics", "ssim", "fid", "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| styled | 4 |" in out and "| one | 1 | 1 | n/a |" in out
    assert "- one: fid: n/a (needs at least 2 styled images and 2 style images (got 1 and 2))" in out
    assert "- styled: ssim: mean over 3 of 4 images (see the rows below)" in out
    assert "- styled/tiny: " in out and "not scored for ssim" in out


def test_eval_report_problems_cover_unreadable_outputs_and_size_mismatches(tmp_path):
    from stylora.eval.report import EvalConfig, evaluate

    content, styled, style = _eval_dirs(tmp_path)
    (styled / "p0.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 16), (0, 0, 0)).save(styled / "p1.png")
    cfg = EvalConfig(content=str(content), styled=(str(styled),), out=str(tmp_path / "r"), style=str(style),
                     metrics=("ssim", "gram", "fid"))
    rows = {r["image"]: r for r in evaluate(cfg, nets=fake_nets(), progress=False)["methods"]["styled"]["rows"]}
    assert "p0.png" in rows["p0"]["error"] and "ssim" not in rows["p0"] and "gram" not in rows["p0"]
    assert rows["p1"]["error"].startswith("size mismatch: content 16x16, output 8x16")
    assert rows["p1"]["gram"] == pytest.approx(0.25 + 0.25)  # the style metric needs no content photo
    md = (tmp_path / "r" / "report.md").read_text().splitlines()
    problems = md[md.index("## Problems") + 2:]
    assert problems[:2] == ["- styled: ssim: mean over 1 of 3 images (see the rows below)",
                            "- styled: gram: mean over 2 of 3 images (see the rows below)"]
    assert problems[2].startswith("- styled/p0: ") and problems[3].startswith("- styled/p1: size mismatch")


def test_score_images_refuses_pairs_of_two_sizes_and_shows_no_progress_bar(tmp_path, capsys):
    from stylora.eval.scoring import score_images

    with pytest.raises(ValueError, match=r"styled.*content"):
        score_images(flat(0.5, 16, 16), flat(0.5, 16, 20), metrics=("lpips",), nets=fake_nets())
    style = _folder(tmp_path / "style", [(255, 0, 0), (0, 0, 255)])
    capsys.readouterr()
    score_images(flat(0.5), flat(0.5), style_folder=str(style), metrics=("gram", "fid"), nets=fake_nets())
    assert capsys.readouterr().err == ""  # the node's scores: no progress bar in ComfyUI's console


def test_style_gram_statistics_are_taken_at_the_bounded_size(tmp_path):
    """mean_grams scales a style image down to `max_side` on its longer side (never below 1 px), leaves smaller
    ones alone, skips unreadable ones and averages the rest."""
    from stylora.eval.scoring import mean_grams

    class Sizes(MeanColourVGG):
        seen: list = []

        def grams(self, images):
            self.seen.append(tuple(images.shape[-2:]))
            return super().grams(images)

    files = []
    for name, size, colour in (("wide", (64, 16), (255, 0, 0)), ("line", (200, 1), (0, 0, 255)),
                               ("small", (8, 4), (0, 255, 0))):
        files.append(tmp_path / f"{name}.png")
        Image.new("RGB", size, colour).save(files[-1])
    (tmp_path / "broken.png").write_bytes(b"no image")
    vgg = Sizes()
    grams = mean_grams(vgg, [*files, tmp_path / "broken.png"], 32, "cpu", progress=False)
    assert vgg.seen == [(8, 32), (1, 32), (4, 8)]  # (H, W): 64x16 -> 32x8, 200x1 -> 32x1, 8x4 kept
    assert grams[0].flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="--style: no usable style image"):
        mean_grams(vgg, [tmp_path / "broken.png"], 32, "cpu", progress=False)


def test_style_set_features_are_read_back_from_the_cache_and_an_empty_style_set_is_refused(tmp_path):
    from stylora.eval.scoring import StyleSet, style_set_features

    class Counting(ColourFeatures):
        calls = 0

        def forward(self, images):
            Counting.calls += 1
            return super().forward(images)

    style = _folder(tmp_path / "style", [(255, 0, 0), (0, 0, 255)])
    files = sorted(style.iterdir())
    first = style_set_features(Counting(), files, str(tmp_path / "cache"), False, cacheable=True)
    again = style_set_features(Counting(), files, str(tmp_path / "cache"), False, cacheable=True)
    assert Counting.calls == 2 and first.tolist() == again.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    style_set_features(Counting(), files, str(tmp_path / "other"), False, cacheable=False)
    assert Counting.calls == 4 and not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="style: no readable style image for LPIPS to the style"):
        StyleSet([])


def test_style_metrics_node_declares_its_inputs_logs_its_text_and_asks_the_host_for_its_device(monkeypatch, caplog):
    import logging
    import sys
    import types

    from stylora.nodes import metrics as node_module

    inputs = node_module.StyleMetrics.INPUT_TYPES()
    assert list(inputs["required"]) == ["content", "styled"]
    assert list(inputs["optional"]) == ["style", "style_folder", "csv_path", "label"]
    assert node_module.StyleMetrics.OUTPUT_NODE is True
    monkeypatch.setattr(node_module, "load_nets", lambda wanted: (fake_nets(), {}))
    node = node_module.StyleMetrics()
    with caplog.at_level(logging.INFO, logger="stylora.nodes.metrics"):
        as_json = node.measure(flat(0.5), flat(0.25))["result"][1]
        broken = flat(0.25)
        broken[0, 0, 0, 0] = float("nan")
        node.measure(flat(0.5), broken)
    levels = [r.levelname for r in caplog.records if r.message.startswith("StyleMetrics:\n1 image(s)")]
    assert levels == ["INFO", "WARNING"]  # NaN pixels are a warning in ComfyUI's console
    assert as_json.startswith('{\n "images": 1,\n "per_image": {\n  "ssim": [')
    host = types.ModuleType("comfy")
    host.model_management = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu", 0))
    monkeypatch.setitem(sys.modules, "comfy", host)
    monkeypatch.setitem(sys.modules, "comfy.model_management", host.model_management)
    assert node_module.torch_device() == torch.device("cpu", 0)  # ComfyUI's choice, not the fallback's


def test_eval_plots_what_it_says(tmp_path, capsys, drawn):  # noqa: F811
    import matplotlib.pyplot as plt
    from stylora.eval.report import EvalConfig, evaluate

    content, styled, style = _eval_dirs(tmp_path)
    cfg = EvalConfig(content=str(content), styled=(str(styled),), out=str(tmp_path / "r"), style=str(style),
                     metrics=("ssim", "gram"))
    capsys.readouterr()
    evaluate(cfg, nets=fake_nets(), progress=False)
    assert capsys.readouterr().err == ""  # progress=False: no progress bar
    titles = [c[2][0] for c in drawn if c[0] == "set_title"]
    assert titles == ["SSIM to the content photo (structure kept) (higher is better)",
                      "Gram style loss to the style set's mean Gram matrices (VGG-19) (lower is better)",
                      "Content preservation vs style"]
    assert [c[2] for c in drawn if c[0] == "set_xlabel"] == [("ssim (content preservation)",)]
    scatter = [c for c in drawn if c[0] == "scatter"]
    assert len(scatter) == 1 and len(scatter[0][2][0]) == 3 and scatter[0][3]["label"] == "styled"
    assert [c[0] for c in drawn].count("tight_layout") == 3 and plt.get_fignums() == []
    with Image.open(tmp_path / "r" / "plot_ssim.png") as plot:
        assert plot.size == (440, 396)  # figsize (4, 3.6) inches at 110 dpi
    drawn.clear()
    cfg = EvalConfig(content=str(content), styled=(str(styled),), out=str(tmp_path / "r2"),
                     metrics=("lpips", "content"))
    evaluate(cfg, nets=fake_nets(), progress=False)
    assert [c[2] for c in drawn if c[0] == "set_xlabel"] == [("lpips (content preservation)",)]
