"""`stylora train textual-inversion` (Gal et al., ICLR 2023) on the tiny SD1.5-shaped model: the file in the layout
A1111 and ComfyUI read (one tensor, key emb_params), loaded by diffusers' load_textual_inversion, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from stylora.trainer.config import TextualInversionConfig
from stylora.trainer.textual_inversion import STYLE_TEMPLATES, train_textual_inversion

FAST = dict(resolution=64, batch_size=2, steps=6, learning_rate=5e-2, min_images=1, checkpoint_every=0, log_every=2,
            seed=0)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    from conftest import make_style_folder

    root = tmp_path_factory.mktemp("ti")
    style = make_style_folder(root / "style")
    cfg = TextualInversionConfig(data=str(style), output=str(root / "monet_ti.safetensors"),
                                 base_model=str(tiny_model["diffusers"]), num_vectors=2, **FAST)
    return {"cfg": cfg, "result": train_textual_inversion(cfg, progress=False), "path": root / "monet_ti.safetensors",
            "style": style}


def _a1111_read(path) -> torch.Tensor:
    """A1111's reading of a safetensors embedding (textual_inversion.create_embedding_from_data, the single-tensor
    case kohya's trainers write): one tensor, [vectors, D] (a [D] one counts as one vector). ComfyUI's load_embed
    takes the same tensor (no string_to_param, no clip_l key: the first value)."""
    data = load_file(str(path))
    assert "string_to_param" not in data and len(data) == 1, f"A1111 refuses embeddings with keys {list(data)}"
    emb = next(iter(data.values()))
    return emb[None] if emb.ndim == 1 else emb


def test_the_embedding_is_in_a1111_and_comfyui_layout(trained, tiny_model):
    from stylora.trainer.base_model import load_base_model

    path = trained["path"]
    assert set(load_file(str(path))) == {"emb_params"}  # the key A1111's and kohya's embeddings use
    vectors = _a1111_read(path)
    base = load_base_model(str(tiny_model["diffusers"]))
    hidden = base.text_encoder.config.hidden_size
    assert vectors.shape == (2, hidden) and vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer("painting", add_special_tokens=False)
                                                           .input_ids[0]]
    assert (vectors - init).abs().max() > 1e-3  # trained away from the initializer word
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["stylora.kind"] == "textual_inversion" and meta["stylora.trigger"] == "embedding:monet_ti"
    assert json.loads(meta["stylora.config"])["num_vectors"] == 2 and meta["stylora.steps"] == "6"
    assert meta["stylora.base_model_sha256"] == base.sha256
    assert (path.parent / "monet_ti.train_log.csv").is_file() and (path.parent / "monet_ti.loss_curve.png").is_file()
    record = json.loads((path.parent / "monet_ti.resources.json").read_text())
    assert record["kind"] == "textual_inversion" and record["steps"] == 6


def test_diffusers_load_textual_inversion_reads_it_and_it_changes_the_conditioning(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model["diffusers"]), safety_checker=None)
    vectors = _a1111_read(trained["path"])

    def condition(prompt: str) -> torch.Tensor:
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    plain = condition("a painting in the style of monet")
    pipe.load_textual_inversion(str(trained["path"]), token="<monet>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<monet>", "<monet>_1"])
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids].detach(), vectors.to(table.dtype))
    styled = condition("a painting in the style of <monet>")
    assert (styled - plain).abs().max() > 1e-3


def test_resume_continues_exactly(tiny_model, style_folder, tmp_path):
    from stylora.trainer.checkpoint import checkpoint_root

    cfg = TextualInversionConfig(data=str(style_folder), output=str(tmp_path / "a.safetensors"),
                                 base_model=str(tiny_model["diffusers"]), **{**FAST, "steps": 4,
                                                                            "checkpoint_every": 2})
    train_textual_inversion(cfg, progress=False)
    whole = load_file(str(tmp_path / "a.safetensors"))["emb_params"]
    (tmp_path / "a.safetensors").unlink()  # killed after step 2's checkpoint
    import shutil

    shutil.rmtree(checkpoint_root(tmp_path / "a.safetensors") / "step-00000004")
    resumed = train_textual_inversion(cfg, resume=True, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    torch.testing.assert_close(load_file(str(tmp_path / "a.safetensors"))["emb_params"], whole)
    with pytest.raises(ValueError, match="num_vectors: 1 -> 2"):
        (tmp_path / "a.safetensors").unlink()
        shutil.rmtree(checkpoint_root(tmp_path / "a.safetensors") / "step-00000004")
        train_textual_inversion(TextualInversionConfig(**{**cfg.to_dict(), "num_vectors": 2}), resume=True,
                                progress=False)


def test_bad_input_is_named(tiny_model, tmp_path):
    from stylora.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / "tiny.png")
    code = main(["train", "textual-inversion", "--data", str(broken), "--output", str(tmp_path / "x.safetensors"),
                 "--base-model", str(tiny_model["diffusers"]), "--resolution", "64", "--no-progress"])
    assert code == 2 and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="initializer must be one word"):
        TextualInversionConfig(data="d", output="o.safetensors", initializer="oil painting")
    with pytest.raises(ValueError, match="output must be a .safetensors"):
        TextualInversionConfig(data="d", output="o.pt")
    assert all("{}" in t for t in STYLE_TEMPLATES)
