"""`stylora prepare`: WikiArt (Kaggle folders and Hugging Face parquet), COCO content sets, statistics."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import skimage_photos, skimage_textures
from PIL import Image
from stylora.data.prepare import PrepareConfig, dataset_stats, dhash, prepare


def _jpeg(arr: np.ndarray, size=(200, 160)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").resize(size).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture
def kaggle_root(tmp_path):
    """<root>/<Style>/<artist>_<title>.jpg with a near-duplicate, a broken file and a tiny image."""
    root = tmp_path / "wikiart"
    imp, ukiyo = root / "Impressionism", root / "Ukiyo_e"
    imp.mkdir(parents=True)
    ukiyo.mkdir()
    photos, textures = skimage_photos(), skimage_textures()
    for name, arr in photos.items():
        (imp / f"claude-monet_{name}-1890.jpg").write_bytes(_jpeg(arr))
    (imp / "pierre-auguste-renoir_brick.jpg").write_bytes(_jpeg(textures["brick"]))
    (imp / "claude-monet_coffee-copy.jpg").write_bytes(_jpeg(photos["coffee"], size=(180, 144)))  # near-duplicate
    (imp / "claude-monet_broken.jpg").write_bytes(_jpeg(photos["rocket"])[:300])
    (imp / "claude-monet_tiny.jpg").write_bytes(_jpeg(photos["chelsea"], size=(20, 16)))
    for name in ("grass", "gravel"):
        (ukiyo / f"hokusai_{name}.jpg").write_bytes(_jpeg(textures[name]))
    return root


def test_dhash_matches_rescaled_copies_not_other_images():
    a = Image.fromarray(skimage_photos()["coffee"])
    same = bin(dhash(a) ^ dhash(a.resize((200, 150)))).count("1")
    other = bin(dhash(a) ^ dhash(Image.fromarray(skimage_photos()["rocket"]))).count("1")
    assert same <= 6 < other


def test_kaggle_layout_selects_dedupes_and_writes_manifest(kaggle_root, tmp_path):
    out = tmp_path / "monet"
    cfg = PrepareConfig(source=str(kaggle_root), out=str(out), style="impressionism", count=10, resolution=64,
                        min_side=32)
    manifest = prepare(cfg, "wikiart", progress=False)
    kept = {m["source"].rsplit("/", 1)[-1] for m in manifest["images"]}
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert manifest["count"] == 5 and manifest["candidates"] == 8
    assert "claude-monet_broken.jpg" in reasons and "too small" in reasons["claude-monet_tiny.jpg"]
    coffee = {"claude-monet_coffee-1890.jpg", "claude-monet_coffee-copy.jpg"}
    assert len(coffee & kept) == 1 and any("near-duplicate" in reasons.get(f, "") for f in coffee)
    assert all(m["style"] == "Impressionism" for m in manifest["images"])
    assert {m["artist"] for m in manifest["images"]} == {"claude-monet", "pierre-auguste-renoir"}
    for m in manifest["images"]:
        with Image.open(out / m["file"]) as im:
            assert im.size == (64, 64)
    assert json.loads((out / "manifest.json").read_text())["count"] == 5
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 5 and {"file", "source", "style", "artist", "width", "height", "dhash"} <= set(rows[0])


def test_selection_is_deterministic_and_filters_by_artist(kaggle_root, tmp_path):
    def pick(seed, out, **kw):
        cfg = PrepareConfig(source=str(kaggle_root), out=str(tmp_path / out), style="Impressionism", count=2,
                            resolution=64, min_side=32, seed=seed, **kw)
        return [m["source"] for m in prepare(cfg, "wikiart", progress=False)["images"]]

    assert pick(0, "a") == pick(0, "b")
    assert {tuple(pick(s, f"s{s}")) for s in range(6)} != {tuple(pick(0, "a"))}  # the seed changes the choice
    assert all("renoir" in s for s in pick(0, "r", artist="Pierre Auguste Renoir"))


def test_unknown_style_lists_the_styles_found(kaggle_root, tmp_path):
    with pytest.raises(ValueError, match=r"no images .* styles found: Impressionism \(8\), Ukiyo_e \(2\)"):
        prepare(PrepareConfig(source=str(kaggle_root), out=str(tmp_path / "x"), style="Cubism"), "wikiart",
                progress=False)


def test_hugging_face_parquet_layout_with_class_labels(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    photos = list(skimage_photos().values())
    styles = ["Impressionism", "Ukiyo_e"]
    artists = ["claude-monet", "hokusai"]
    rows = {"image": [{"bytes": _jpeg(a), "path": f"img{i}.jpg"} for i, a in enumerate(photos)],
            "artist": [0, 0, 1, 0], "genre": [1, 1, 0, 1], "style": [0, 0, 1, 0]}
    table = pa.table(rows)
    features = {"image": {"_type": "Image"}, "artist": {"_type": "ClassLabel", "names": artists},
                "genre": {"_type": "ClassLabel", "names": ["portrait", "landscape"]},
                "style": {"_type": "ClassLabel", "names": styles}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    data = tmp_path / "hf" / "data"
    data.mkdir(parents=True)
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    cfg = PrepareConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "out"), style="impressionism", count=10,
                        resolution=64, min_side=32)
    manifest = prepare(cfg, "wikiart", progress=False)
    assert manifest["count"] == 3
    assert {m["artist"] for m in manifest["images"]} == {"claude-monet"}
    assert {m["genre"] for m in manifest["images"]} == {"landscape"}
    assert all("#" in m["source"] for m in manifest["images"])


def test_coco_content_set_and_stats(tmp_path, kaggle_root):
    coco = tmp_path / "val2017"
    coco.mkdir()
    for i, arr in enumerate(skimage_photos().values()):
        (coco / f"{i:012d}.jpg").write_bytes(_jpeg(arr, size=(320, 240)))
    manifest = prepare(PrepareConfig(source=str(coco), out=str(tmp_path / "content"), count=3, resolution=64,
                                     min_side=32), "coco", progress=False)
    assert manifest["count"] == 3 and len(list((tmp_path / "content").glob("*.jpg"))) == 3

    summary = dataset_stats([tmp_path / "content", kaggle_root / "Ukiyo_e"], tmp_path / "stats")
    assert summary["images"] == 5 and summary["per_style"] == {"content": 3, "Ukiyo_e": 2}
    for name in ("style_counts.png", "size_hist.png", "aspect_hist.png", "sample_grid.png"):
        with Image.open(tmp_path / "stats" / name) as im:
            im.verify()
    assert "| Ukiyo_e | 2 |" in (tmp_path / "stats" / "summary.md").read_text()


def test_stats_count_only_usable_images_and_name_every_skipped_file(tmp_path, capsys):
    import struct
    import zlib

    from stylora.cli import main

    folder = tmp_path / "paintings"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), "red").save(folder / "good.png")
    Image.new("RGB", (10, 30), "blue").save(folder / "sub" / "good2.jpg")
    whole = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), size=(64, 64))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels stop
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "caption.txt").write_text("a caption: a sidecar, neither counted nor skipped")
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # a header claiming 900 megapixels
    bomb = b"\x89PNG\r\n\x1a\n"
    for kind, body in ((b"IHDR", ihdr), (b"IDAT", zlib.compress(b"")), (b"IEND", b"")):
        bomb += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (folder / "bomb.png").write_bytes(bomb)
    summary = dataset_stats([folder], tmp_path / "stats")
    assert summary["images"] == 2 and summary["width"] == {"min": 10.0, "median": 25.0, "max": 40.0}
    reasons = {Path(s["file"]).name: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"truncated.jpg", "notes.pdf", "bomb.png"}
    assert reasons["notes.pdf"] == "not an image (extension)" and reasons["truncated.jpg"].startswith("truncated")
    assert reasons["bomb.png"].startswith("refused: decompression bomb")
    md = (tmp_path / "stats" / "summary.md").read_text()
    assert "Skipped (not counted): 3 file(s)." in md and f"| {folder / 'bomb.png'} | refused" in md
    assert main(["prepare", "stats", str(folder), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 images;") and "Skipped 3 file(s) (not counted):" in out and "truncated.jpg: trunc" in out
