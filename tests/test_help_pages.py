"""The node library's help pages (nodes/web/docs/<NodeClass>.md) say what the tooltips say: written from them."""

from __future__ import annotations

from stylora.nodes import NODE_CLASS_MAPPINGS
from stylora.nodes.help_pages import DOCS, render


def test_every_node_has_a_page_in_sync_with_its_tooltips():
    pages = sorted(p.stem for p in DOCS.glob("*.md"))
    assert pages == sorted(NODE_CLASS_MAPPINGS), "regenerate: python -m stylora.nodes.help_pages"
    for name in NODE_CLASS_MAPPINGS:
        assert (DOCS / f"{name}.md").read_text() == render(name), f"{name}.md is stale (regenerate it)"


def test_a_page_carries_the_description_every_input_tooltip_and_the_paper():
    node = NODE_CLASS_MAPPINGS["StyleFromImage"]
    page = (DOCS / "StyleFromImage.md").read_text()
    assert node.DESCRIPTION in page and "CVPR 2024" in page.split("## Paper")[1]
    for group in node.INPUT_TYPES().values():
        for name, spec in group.items():
            assert f"- **{name}**" in page and spec[1]["tooltip"] in page
    for tip in node.OUTPUT_TOOLTIPS:
        assert tip in page


def test_the_pack_serves_the_pages_from_its_web_directory():
    import stylora

    assert (DOCS.parent.resolve() == (DOCS.parents[2] / stylora.WEB_DIRECTORY).resolve())
