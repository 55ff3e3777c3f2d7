"""The repository is a ComfyUI custom-node pack and an installable `stylora` distribution at once."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import tomllib
from conftest import REPO


def test_layout_is_the_documented_one():
    for name in ("__init__.py", "cli.py", "core", "eval", "data", "trainer", "nodes", "workflows", "examples",
                 "pyproject.toml", "README.md", "tests", ".ci/run", "requirements.txt"):
        assert (REPO / name).exists(), name


def test_pyproject_lists_every_package():
    """A real install carries only the packages pyproject names: every folder with an __init__.py must be there."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    found = {"stylora"} | {"stylora." + ".".join(p.parent.relative_to(REPO).parts) for p in REPO.glob("*/__init__.py")
                           if p.parent.name not in ("tests", "benchmarks")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
    assert meta["project"]["scripts"]["stylora"] == "stylora.cli:main"


def test_pack_loads_the_way_comfyui_loads_it():
    """ComfyUI imports the folder's __init__.py under the folder's name, with no ComfyUI modules needed here."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ComfyUI-Stylora', {str(REPO / '__init__.py')!r},"
        f" submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['ComfyUI-Stylora'] = m; spec.loader.exec_module(m)\n"
        "assert isinstance(m.NODE_CLASS_MAPPINGS, dict) and isinstance(m.NODE_DISPLAY_NAME_MAPPINGS, dict)\n"
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_installed_distribution_has_no_generic_top_level_modules():
    dist = importlib.metadata.distribution("stylora")
    assert any(ep.name == "stylora" for ep in dist.entry_points if ep.group == "console_scripts")
    for generic in ("nodes", "eval", "trainer"):
        spec = importlib.util.find_spec(generic)
        assert spec is None or "site-packages" not in str(spec.origin), f"{generic} installed at top level"
    assert importlib.util.find_spec("stylora.cli") is not None


def test_requirements_do_not_replace_the_hosts_torch():
    reqs = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs if r}
    assert not names & {"torch", "torchvision", "torchaudio"}
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "tool" in meta and "comfy" in meta["tool"] and meta["tool"]["comfy"]["PublisherId"]
    assert not any("torchvision" in d for d in meta["project"]["dependencies"])


def test_shipped_sd15_configs_are_installed_package_data():
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (SHIPPED_SD15_CONFIG / rel).is_file(), rel
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = meta["tool"]["setuptools"]["package-data"]["stylora.trainer"]
    assert "sd15/*/*.txt" in globs and "sd15/*/*.json" in globs


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path):
    import os

    import pytest
    from stylora.core.files import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda tmp: (open(tmp, "w").write("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
