"""The study's report on hand-made scores: the targets' verdicts on both sides of each limit, the means over seeds
and styles with their reasons, the SSIM crossing, the cell formats, report.md/report.json and the grid."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from stylora.study import report
from stylora.study.config import StudyConfig
from stylora.study.report import BASE, NO_TRAINING, TARGETS, UNAVAILABLE


def _mean_row(method: str, strength: float, **values) -> dict:
    full = {c: None for c in report.COLUMNS}
    full.update(values)
    return {"method": method, "strength": strength, "values": full, "unavailable": {}}


# --- the targets -------------------------------------------------------------------------------------------------

def test_target_limits_are_the_studys():
    assert TARGETS == {"fid": ("<", 60.0), "ssim": (">", 0.7), "lpips_style": ("<", 0.3),
                       "seconds_per_image": ("<", 5.0)}


@pytest.mark.parametrize(("column", "below", "at", "above"), [
    ("fid", "met", "not met", "not met"),  # FID < 60
    ("ssim", "not met", "not met", "met"),  # SSIM > 0.7
    ("lpips_style", "met", "not met", "not met"),  # LPIPS to the style < 0.3
    ("seconds_per_image", "met", "not met", "not met"),  # < 5 s per image
])
def test_targets_say_met_only_on_the_right_side_of_each_limit(column, below, at, above):
    limit = {"fid": 60.0, "ssim": 0.7, "lpips_style": 0.3, "seconds_per_image": 5.0}[column]
    eps = limit * 1e-6
    mean = [_mean_row("below", 0.4, **{column: limit - eps}), _mean_row("at", 0.4, **{column: limit}),
            _mean_row("above", 0.4, **{column: limit + eps}), _mean_row("none", 0.4),
            _mean_row("other strength", 0.8, **{column: limit - eps})]
    verdicts = report.targets(mean, 0.4)
    assert verdicts["below"][column] == below and verdicts["at"][column] == at
    assert verdicts["above"][column] == above and verdicts["none"][column] == "unmeasured"
    assert "other strength" not in verdicts
    assert set(verdicts["below"]) == set(TARGETS)


# --- rows, means and reasons -------------------------------------------------------------------------------------

@pytest.fixture
def study(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cfg = StudyConfig(styles=(("a", str(tmp_path / "a")), ("b", str(tmp_path / "b"))), content=str(tmp_path),
                      out=str(tmp_path / "out"), methods=("base", "image"), strengths=(0.2, 0.6), seeds=(0, 1),
                      grid_rows=2)
    jobs = [(BASE if m == "base" else s, m, st, seed, f"{BASE if m == 'base' else s}/{m}/{st}/{seed}")
            for m in cfg.methods for s in ("a", "b") for st in cfg.strengths for seed in cfg.seeds]
    jobs = list(dict.fromkeys(jobs))  # base is stylised once for both styles
    entry = lambda mean, set_=None: {"mean": mean, "set": set_ or {}}  # noqa: E731
    reports = {"a": {"unavailable": {"gram": "vgg19 weights missing"}, "methods": {
        "a/image/0.2/0": entry({"ssim": 0.8, "lpips_style": float("nan"), "lpips": 0.1}, {"fid": 50.0, "kid": 0.1}),
        "a/image/0.2/1": entry({"ssim": 0.6, "lpips_style": 0.2, "lpips": 0.3}, {"fid": 70.0}),
        "a/image/0.6/0": entry({"ssim": 0.5}), "a/image/0.6/1": entry({"ssim": 0.3}),
        "_base/base/0.2/0": entry({"ssim": 0.9}), "_base/base/0.2/1": entry({"ssim": 0.9}),
    }}}
    stylize = {"a/image/0.2/0": {"seconds": {"p1": 2.0, "p2": 4.0}}, "a/image/0.2/1": {"seconds": {"p1": 6.0}},
               "b/image/0.2/0": {"seconds": {"p1": float("inf")}}}
    costs = {"a/image": None}
    skipped = {"_base/base/0.6/0": "server lost"}
    return cfg, jobs, reports, stylize, costs, skipped


def test_collect_means_over_seeds_with_a_reason_for_each_gap(study):
    cfg, jobs, reports, stylize, costs, skipped = study
    rows = report.collect(cfg, jobs, reports, stylize, costs, skipped)
    assert [(r["method"], r["style"], r["strength"]) for r in rows] == [
        (m, s, st) for m in ("base", "image") for s in ("a", "b") for st in (0.2, 0.6)]
    by = {(r["method"], r["style"], r["strength"]): r for r in rows}
    a02 = by["image", "a", 0.2]
    assert a02["values"]["ssim"] == pytest.approx(0.7) and a02["values"]["lpips"] == pytest.approx(0.2)
    assert a02["values"]["fid"] == pytest.approx(60.0) and a02["values"]["kid"] == pytest.approx(0.1)
    assert a02["values"]["lpips_style"] == pytest.approx(0.2)  # the NaN seed left out...
    assert a02["unavailable"]["lpips_style"] == "not a finite number"  # ...and said
    assert a02["unavailable"]["gram"] == "vgg19 weights missing"
    assert a02["unavailable"]["content"] == "not computed"
    assert a02["unavailable"]["artfid"] == "needs at least 2 outputs and 2 style images (FID/KID)"
    assert a02["values"]["seconds_per_image"] == pytest.approx(4.0)  # (2 + 4 + 6) / 3 photos
    assert a02["values"]["train_seconds"] is None and a02["unavailable"]["train_seconds"] == NO_TRAINING
    assert by["image", "a", 0.6]["values"]["ssim"] == pytest.approx(0.4)
    assert by["image", "a", 0.6]["unavailable"]["seconds_per_image"] == "no image stylised and timed by this study"
    assert by["image", "b", 0.2]["unavailable"]["ssim"] == "not scored (nothing stylised for this style)"
    assert by["image", "b", 0.2]["values"]["seconds_per_image"] is None  # an infinite time is no time
    assert by["base", "a", 0.2]["values"]["ssim"] == pytest.approx(0.9)
    assert by["base", "b", 0.2]["unavailable"]["ssim"] == "not scored (nothing stylised for this style)"
    assert by["base", "a", 0.6]["unavailable"]["ssim"] == "skipped: server lost"
    assert by["base", "a", 0.6]["unavailable"]["seconds_per_image"] == "skipped: server lost"
    reports["a"]["methods"].pop("a/image/0.6/0")
    reports["a"]["methods"].pop("a/image/0.6/1")
    rows = report.collect(cfg, jobs, reports, stylize, {"a/image": {"train_seconds": 90.0, "bytes": 2e6}}, {})
    a06 = next(r for r in rows if (r["method"], r["style"], r["strength"]) == ("image", "a", 0.6))
    assert a06["unavailable"]["ssim"] == "not stylised"
    assert a06["values"]["train_seconds"] == 90.0 and a06["values"]["file_bytes"] == 2e6
    assert a06["unavailable"]["peak_memory_mb"] == NO_TRAINING  # image needs no training
    object.__setattr__(cfg, "methods", ("lora",))  # a trained method without its training settings checked
    rows = report.collect(cfg, [("a", "lora", 0.2, 0, "a/lora/0.2/0")], {}, {}, {"a/lora": {"peak_memory_mb": 1.0}},
                          {})
    assert rows[0]["values"]["peak_memory_mb"] == 1.0 and rows[0]["unavailable"]["train_seconds"] == \
        "no resource record"


def test_mean_rows_average_the_styles_and_keep_the_first_reason(study):
    cfg, jobs, reports, stylize, costs, skipped = study
    rows = report.collect(cfg, jobs, reports, stylize, costs, skipped)
    mean = report.mean_rows(cfg, rows)
    assert [(r["method"], r["strength"]) for r in mean] == [("base", 0.2), ("base", 0.6), ("image", 0.2),
                                                           ("image", 0.6)]
    assert all(r["style"] == "all styles (mean)" for r in mean)
    assert mean[2]["values"]["ssim"] == pytest.approx(0.7)  # style b has none: the mean of what is known
    assert mean[2]["values"]["fid"] == pytest.approx(60.0)
    assert mean[2]["unavailable"]["gram"] == "vgg19 weights missing"
    assert "ssim" not in mean[2]["unavailable"]


def test_ssim_crossing_interpolates_between_strengths():
    mean = [_mean_row("m", 0.2, ssim=0.9), _mean_row("m", 0.6, ssim=0.5), _mean_row("m", 0.8, ssim=0.4),
            _mean_row("x", 0.2, ssim=0.7), _mean_row("x", 0.6, ssim=0.7)]
    assert report.ssim_crossing(mean, "m") == {"strength": pytest.approx(0.2 + 0.2 / 0.4 * 0.4), "reason": None}
    assert report.ssim_crossing(mean, "x")["strength"] is None  # flat at the target: no single crossing
    up = [_mean_row("u", 0.2, ssim=0.6), _mean_row("u", 0.4, ssim=0.8)]
    assert report.ssim_crossing(up, "u")["strength"] == pytest.approx(0.3)
    at = [_mean_row("t", 0.2, ssim=0.7), _mean_row("t", 0.4, ssim=0.5)]
    assert report.ssim_crossing(at, "t")["strength"] == pytest.approx(0.2)
    above = [_mean_row("h", 0.2, ssim=0.9), _mean_row("h", 0.8, ssim=0.8)]
    assert report.ssim_crossing(above, "h") == {"strength": None,
                                               "reason": "SSIM stays above 0.7 at every strength (0.2..0.8)"}
    below = [_mean_row("l", 0.4, ssim=0.6)]
    assert report.ssim_crossing(below, "l")["reason"] == "SSIM stays below 0.7 at every strength (0.4..0.4)"
    assert report.ssim_crossing([_mean_row("n", 0.2)], "n") == {"strength": None, "reason": "SSIM unavailable"}


def test_cells_are_formatted_per_column():
    assert report._fmt("train_seconds", 90.0, None) == "1.5 min"
    assert report._fmt("peak_memory_mb", 1234.4, None) == "1234 MB"
    assert report._fmt("file_bytes", 2_500_000, None) == "2.5 MB"
    assert report._fmt("seconds_per_image", 1.234, None) == "1.23"
    assert report._fmt("fid", 123.456, None) == "123.5"
    assert report._fmt("fid", None, "why") == UNAVAILABLE and report._fmt("train_seconds", None, NO_TRAINING) == \
        NO_TRAINING


def test_write_report_tables_targets_and_json(study, tmp_path):
    cfg, jobs, reports, stylize, costs, skipped = study
    styled_root = tmp_path / "styled"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (20, 10), (0, 255, 0)).save(photo)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a" / "painting.png")
    (styled_root / "a/image/0.2/0").mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(styled_root / "a/image/0.2/0" / "photo.png")
    log = tmp_path / "a.train_log.csv"
    log.write_text("step,loss\n2,0.5\n1,0.75\n")
    out = report.write_report(tmp_path / "rep", cfg, jobs=jobs, reports=reports, stylize=stylize, costs=costs,
                               skipped=skipped, stage_seconds={"train": 30.0, "stylise": 10.0},
                               styled_root=styled_root, photos=[photo], loss_logs={"a/image": log})
    md = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert md[2].startswith("2 style(s) (a, b), 1 content photo(s), methods base, image, strengths 0.2, 0.6")
    assert "## Comparison at strength 0.2" in md
    head = md.index("## Comparison at strength 0.2") + 2
    assert md[head] == ("| method | style | SSIM ↑ | LPIPS ↓ | content ↓ | LPIPS to style ↓ | Gram ↓ | FID ↓ | KID ↓ | "
                        "ArtFID ↓ | s / image | training time | peak memory | file size |")
    assert "| image | a | 0.7 | 0.2 | unavailable | 0.2 | unavailable | 60 | 0.1 | unavailable | 4.00 | " \
           f"{NO_TRAINING} | {NO_TRAINING} | {NO_TRAINING} |" in md
    assert "- Gram: vgg19 weights missing" in md and "- LPIPS to style: not a finite number" in md
    targets = md.index("| method | FID < 60 | SSIM > 0.7 | LPIPS to style < 0.3 | < 5 s per image (T4, 512x512) |")
    assert md[targets + 2:targets + 4] == ["| base | unmeasured | met | unmeasured | unmeasured |",
                                           "| image | not met | not met | met | met |"]
    assert "| image | 0.2 | 0.7 | unavailable | 60 | 4.00 |" in md
    assert "- image: strength 0.20" in md and "- base: SSIM stays above 0.7 at every strength (0.2..0.2)" in md
    assert "- _base/base/0.6/0: server lost" in md
    assert "| train | 30.0 s | 75% |" in md and "| total | 40.0 s | |" in md
    assert "| a | image | 2 | 0.75 | 0.5 |" in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["targets"]["limits"]["fid"] == {"op": "<", "value": 60.0}
    assert data["targets"]["verdicts"]["image"]["fid"] == "not met" and data["table_strength"] == 0.2
    assert data["loss_curves"] == {"a/image": {"steps": [1, 2], "loss": [0.75, 0.5]}}
    assert data["stages"]["stylise"] == {"seconds": 10.0, "share": 0.25} and data["photos"] == 1
    assert out["total_seconds"] == 40.0 and data["unavailable"] == {"a": {"gram": "vgg19 weights missing"}}
    with Image.open(tmp_path / "rep" / "grid_a.png") as grid:
        assert grid.size == (4 * 160, 20 + 160)
        assert grid.getpixel((80, 20 + 80)) == (0, 255, 0)  # the photo, scaled to cover its cell
        assert grid.getpixel((160 + 80, 20 + 80)) == (255, 0, 0)  # the painting
        assert grid.getpixel((3 * 160 + 80, 20 + 80)) == (0, 0, 255)  # image at 0.2, seed 0
        assert grid.getpixel((2 * 160 + 80, 20 + 80)) == (255, 255, 255)  # base: not run, a white cell...
        assert any(grid.getpixel((2 * 160 + x, 20 + y)) != (255, 255, 255) for x in range(4, 40) for y in range(4, 14))
    for png in ("sweep_base.png", "sweep_image.png", "loss_curves.png", "grid_b.png"):
        assert (tmp_path / "rep" / png).is_file()
    report.write_report(tmp_path / "none", cfg, jobs=jobs, reports=reports, stylize=stylize, costs=costs,
                        skipped={}, stage_seconds={}, styled_root=styled_root, photos=[photo])
    md = (tmp_path / "none" / "report.md").read_text()
    assert "No trained method in this study, or no loss log found: no loss curves." in md and "## Skipped" not in md
    assert not (tmp_path / "none" / "loss_curves.png").exists()


@pytest.fixture
def drawn(monkeypatch):
    """What the report draws: each call to the Axes/Figure methods below as (name, axes title, args, kwargs),
    recorded before matplotlib runs it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    calls = []
    for cls, name in [(Axes, n) for n in ("plot", "annotate", "set_xlabel", "set_ylabel", "axhline", "legend",
                                                        "set_title", "scatter", "bar")] + \
            [(Figure, "tight_layout")]:
        original = getattr(cls, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            title = self.get_title() if hasattr(self, "get_title") else None
            calls.append((_name, title, args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return calls


def test_sweep_draws_ssim_against_gram_per_style_and_the_mean(drawn, tmp_path):
    rows = [{**_mean_row("m", 0.2, ssim=0.9, gram=2.0), "style": "a"},
            {**_mean_row("m", 0.6, ssim=0.5, gram=1.0), "style": "a"},
            {**_mean_row("other", 0.2, ssim=0.1, gram=9.0), "style": "a"}]
    mean = [{**_mean_row("m", 0.2, ssim=0.8, gram=2.5), "style": "all styles (mean)"}]
    report._sweep(tmp_path / "s.png", "m", rows, mean, {"strength": 0.45})
    plots = [(c[2][0], c[2][1], c[2][2], c[3]) for c in drawn if c[0] == "plot"]
    assert plots == [([2.0, 1.0], [0.9, 0.5], ".--", {"label": "a", "linewidth": 1, "color": None}),
                     ([2.5], [0.8], "o-", {"label": "all styles (mean)", "linewidth": 2.5, "color": "black"})]
    assert [(c[2], c[3]) for c in drawn if c[0] == "annotate"] == [
        (("0.2", (2.5, 0.8)), {"textcoords": "offset points", "xytext": (4, 4), "fontsize": 8})]
    assert [c[2] for c in drawn if c[0] == "set_xlabel"] == [("Gram style loss (lower: closer to the style)",)]
    assert [c[2] for c in drawn if c[0] == "set_ylabel"] == [("SSIM to the content photo",)]
    assert [c[3] for c in drawn if c[0] == "axhline"] == [{"color": "red", "linestyle": ":", "label": "SSIM 0.7"}]
    assert [c[0] for c in drawn].count("tight_layout") == 1 and (tmp_path / "s.png").is_file()
    drawn.clear()
    no_gram = [{**_mean_row("m", 0.2, ssim=0.9), "style": "a"}]
    report._sweep(tmp_path / "t.png", "m", no_gram, [], {"strength": None})
    assert [c[2][0] for c in drawn if c[0] == "plot"] == [[0.2]]  # the strength on the x axis
    assert [c[2] for c in drawn if c[0] == "set_xlabel"] == [("strength (Gram unavailable)",)]


def test_loss_curves_draw_a_panel_per_style_and_a_line_per_method(drawn, tmp_path):
    curves = {"a/lora": ([1, 2], [0.5, 0.25]), "b/dreambooth": (list(range(40)), [0.1] * 40)}
    report._loss_curves(tmp_path / "l.png", ["a", "b", "c"], curves)
    plots = [(c[1], c[2][2], c[3]) for c in drawn if c[0] == "plot"]
    assert plots == [("", "o-", {"markersize": 3, "label": "lora"}),
                     ("", "-", {"markersize": 3, "label": "dreambooth"})]
    labelled = [c for c in drawn if c[0] == "set_xlabel"]
    assert [c[1] for c in labelled] == ["a", "b", "c"] and all(c[2] == ("optimizer step",) for c in labelled)
    assert all(c[2] == ("training loss",) for c in drawn if c[0] == "set_ylabel")
    assert [c[1] for c in drawn if c[0] == "legend"] == ["a", "b"]  # the empty panel has no legend
    assert [c[0] for c in drawn].count("tight_layout") == 1 and (tmp_path / "l.png").is_file()


def test_report_folder_is_made_with_its_parents_and_json_is_indented(study, tmp_path):
    cfg, jobs, reports, stylize, costs, skipped = study
    folder = tmp_path / "new" / "deeper" / "rep"
    report.write_report(folder, cfg, jobs=jobs, reports=reports, stylize=stylize, costs=costs, skipped=skipped,
                        stage_seconds={}, styled_root=tmp_path, photos=[])
    assert (folder / "report.json").read_text().startswith('{\n "config": {\n  "styles"')
    report.write_report(folder, cfg, jobs=jobs, reports=reports, stylize=stylize, costs=costs, skipped=skipped,
                        stage_seconds={}, styled_root=tmp_path, photos=[])  # a rerun writes into the same folder
