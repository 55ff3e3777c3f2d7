"""The frontend's per-node help pages (ComfyUI serves WEB_DIRECTORY/docs/<NodeClass>.md in its node library),
written from the nodes' own DESCRIPTION, input tooltips and OUTPUT_TOOLTIPS, so the page and the tooltips say the
same thing. Regenerate after changing a node's text:

    python -m stylora.nodes.help_pages
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_text
from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parent / "web" / "docs"
# What a page adds beyond the tooltips: the paper a node implements.
PAPERS = {
    "StyleFromImage": "Jiwoo Chung, Sangeek Hyun, Jae-Pil Heo. *Style Injection in Diffusion: A Training-free "
                      "Approach for Adapting Large-scale Diffusion Models for Style Transfer.* CVPR 2024 "
                      "(StyleID). https://arxiv.org/abs/2312.09008",
}


def _input_line(name: str, spec: tuple, optional: bool) -> str:
    kind = spec[0] if isinstance(spec[0], str) else "choice"
    options: dict[str, Any] = spec[1] if len(spec) > 1 else {}
    default = f", default `{options['default']}`" if "default" in options and options["default"] != "" else ""
    tip = options.get("tooltip", "")
    return f"- **{name}** ({kind}{', optional' if optional else ''}{default}): {tip}".rstrip(": ")


def render(class_name: str) -> str:
    """The Markdown help page of one node."""
    node = NODE_CLASS_MAPPINGS[class_name]
    inputs = node.INPUT_TYPES()
    lines = [f"# {NODE_DISPLAY_NAME_MAPPINGS[class_name]}", "", node.DESCRIPTION, "", "## Inputs", ""]
    for group, optional in (("required", False), ("optional", True)):
        lines += [_input_line(name, spec, optional) for name, spec in inputs.get(group, {}).items()]
    lines += ["", "## Outputs", ""]
    names = getattr(node, "RETURN_NAMES", node.RETURN_TYPES)
    tips = getattr(node, "OUTPUT_TOOLTIPS", ("",) * len(names))
    lines += [f"- **{n}** ({t}): {tip}".rstrip(": ") for n, t, tip in zip(names, node.RETURN_TYPES, tips)]
    if class_name in PAPERS:
        lines += ["", "## Paper", "", PAPERS[class_name]]
    return "\n".join(lines) + "\n"


def write_all(folder: Path = DOCS) -> list[Path]:
    """Writes every node's page into `folder`; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for class_name in NODE_CLASS_MAPPINGS:
        path = folder / f"{class_name}.md"
        atomic_write_text(path, render(class_name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for written in write_all():
        logger.info("wrote %s", written)
