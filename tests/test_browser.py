"""The pack on ComfyUI's web canvas, in headless Chromium: what a person meets first.

Needs COMFYUI_DIR (a real ComfyUI, see test_comfyui.py for its other variables), Chromium at /usr/bin/chromium
(Debian package `chromium`) and the `playwright` Python package (no `playwright install`: the system Chromium is
used). Screenshots go to /tmp/canvas-*.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO

CHROMIUM = os.environ.get("STYLORA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
try:
    import playwright.sync_api  # noqa: F401

    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set"),
              pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM}"),
              pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="playwright is not installed")]

NAMES = ["style_transfer", "masked_style", "style_blend", "style_metrics", "style_from_image", "dreambooth",
         "train_style"]

# Node rectangles as the frontend lays them out ([x, y, w, h], title bar included), and overlapping pairs.
OVERLAPS_JS = """() => {
  const boxes = app.graph._nodes.map((n) => [`${n.id} ${n.title}`, n.getBounding()]);
  const out = [];
  for (let i = 0; i < boxes.length; i++)
    for (let j = i + 1; j < boxes.length; j++) {
      const [a, ra] = boxes[i], [b, rb] = boxes[j];
      if (ra[0] < rb[0] + rb[2] && rb[0] < ra[0] + ra[2] && ra[1] < rb[1] + rb[3] && rb[1] < ra[1] + ra[3])
        out.push(`${a} overlaps ${b}`);
    }
  return out;
}"""


@pytest.fixture(scope="module")
def canvas(comfy_server):
    """A Chromium page on the server's canvas, with the example inputs uploaded and a style whose weights
    overflow to inf (finite in the file, as a diverged training can leave them): its images are NaN."""
    from playwright.sync_api import sync_playwright
    from safetensors.torch import save_file
    from stylora.core.lora_file import read_lora

    base = comfy_server["base"]
    for name in ("stylora_content.jpg", "stylora_content_masked.png", "stylora_style.jpg"):
        shutil.copy(REPO / "examples" / name, base / "input" / name)
    state, meta = read_lora(base / "models" / "styles" / "mystyle.safetensors")
    huge = {k: torch.full(v.shape, 1e30 if not k.endswith(".alpha") else 4.0) for k, v in state.items()}
    save_file(huge, str(base / "models" / "styles" / "overflow.safetensors"), metadata=meta)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(comfy_server["url"])
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(3000)
        templates = _templates_browser(page)
        yield {"page": page, "errors": errors, "url": comfy_server["url"], "templates": templates}
        browser.close()


def _templates_browser(page) -> list[list]:
    """The Templates browser's Stylora section (it opens by itself on a first start; otherwise from the sidebar):
    the thumbnails its cards fetched, screenshotted, then the dialog closed."""
    if not page.get_by_text("Get Started with a Template").is_visible():
        page.get_by_text("Templates", exact=True).first.click()
    page.get_by_text("stylora", exact=True).first.click()
    page.wait_for_timeout(2500)
    page.screenshot(path="/tmp/canvas-templates.png")
    cards = page.evaluate("""() => [...new Set(performance.getEntriesByType('resource')
        .map((e) => e.name).filter((u) => u.includes('workflow_templates/stylora/') && u.endsWith('.jpg'))
        .map((u) => u.split('/').pop()))]""")
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    return cards


def _open(page, name: str) -> None:
    """Load a template the way the Templates browser does: fetch its JSON from the pack's template route, then
    app.loadGraphData."""
    page.evaluate("""async (name) => {
        const r = await fetch(`/api/workflow_templates/stylora/${name}.json`);
        await app.loadGraphData(await r.json(), true, true, name);
    }""", name)
    page.wait_for_timeout(800)


def _set(page, values: dict[str, dict]) -> None:
    page.evaluate("""(values) => {
        for (const [title, widgets] of Object.entries(values)) {
            const node = app.graph._nodes.find((n) => n.title === title);
            for (const [name, value] of Object.entries(widgets))
                node.widgets.find((w) => w.name === name).value = value;
        }
    }""", values)


def _run(page, timeout_s: float = 240) -> dict:
    """Queue the canvas's graph as the Queue button does and wait for its history entry; returns its status."""
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as reply:
        page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    assert reply.value.status == 200, reply.value.text()  # the server accepted the graph (no validation error)
    prompt_id = reply.value.json()["prompt_id"]
    for _ in range(int(timeout_s)):  # page.evaluate awaits the fetch (wait_for_function would not)
        status = page.evaluate("""async (id) => (await (await fetch(`/api/history/${id}`)).json())[id]?.status""",
                               prompt_id)
        if status:
            page.wait_for_timeout(1500)  # the executed message reaches the node
            return status
        page.wait_for_timeout(1000)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout_s} s")


def test_page_loads_with_no_error_from_the_pack(canvas):
    page = canvas["page"]
    registered = page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
    assert {"LoadStyleLoRA", "ContentEncode", "StyleStrength", "MaskedStyleApply", "StyleMetrics"} <= set(registered)
    assert [e for e in canvas["errors"] if "stylora" in e.lower()] == []
    listed = page.evaluate("async () => (await (await fetch('/api/workflow_templates')).json()).stylora")
    assert sorted(listed) == sorted(NAMES)
    assert not page.get_by_text("Get Started with a Template").is_visible()


@pytest.mark.parametrize("name", NAMES)
def test_template_opens_with_a_thumbnail_and_no_overlaps(canvas, name):
    page = canvas["page"]
    thumb = page.evaluate("""async (name) => {
        const r = await fetch(`/api/workflow_templates/stylora/${name}.jpg`);
        return [r.status, r.headers.get('content-type')];
    }""", name)
    assert thumb == [200, "image/jpeg"]
    _open(page, name)
    missing = page.evaluate("() => app.graph._nodes.filter((n) => !LiteGraph.registered_node_types[n.type])"
                            ".map((n) => n.type)")
    assert missing == []
    assert not page.get_by_text("Missing Node Types").is_visible()
    assert page.evaluate(OVERLAPS_JS) == []
    page.evaluate("() => { app.canvas.ds.scale = 0.55; app.canvas.ds.offset = [20, 60]; "
                  "app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(500)
    page.screenshot(path=f"/tmp/canvas-{name}.png")


def _small_run(model_style: str) -> dict[str, dict]:
    return {"Checkpoint": {"ckpt_name": "sd15.safetensors"}, "Style": {"style": model_style},
            "Content encode": {"max_side": 64}, "Sampler": {"steps": 1}}


def _metrics_text(page) -> str:
    return page.evaluate("""() => {
        const node = app.graph._nodes.find((n) => n.type === 'StyleMetrics');
        const w = node.widgets?.find((w) => w.name === 'stylora_metrics_text');
        return w ? w.element.value : '';
    }""")


def test_style_metrics_runs_and_shows_its_text_on_the_node(canvas):
    page = canvas["page"]
    _open(page, "style_metrics")
    _set(page, _small_run("mystyle.safetensors"))
    status = _run(page)
    assert status["status_str"] == "success", status
    text = _metrics_text(page)
    assert text.startswith("1 image(s)\nssim: ") and "lpips: n/a (alexnet-owt-7be5be79.pth missing" in text
    assert page.evaluate(OVERLAPS_JS) == []  # the node grew into the room left below it
    page.screenshot(path="/tmp/canvas-style_metrics-run.png")


def test_nan_metrics_leave_the_queue_panel_working(canvas):
    page = canvas["page"]
    _open(page, "style_metrics")
    _set(page, _small_run("overflow.safetensors"))
    status = _run(page)
    assert status["status_str"] == "success", status
    text = _metrics_text(page)
    assert "ssim: n/a (not a finite number" in text and "NaN" not in text.replace("NaN/inf", "")
    # What the Queue panel reads: the history must parse as JSON (Python's NaN would not).
    history = page.evaluate("async () => JSON.stringify(await (await fetch('/api/history?max_items=64')).json())")
    assert len(json.loads(history)) >= 2
    page.screenshot(path="/tmp/canvas-style_metrics-nan.png")
