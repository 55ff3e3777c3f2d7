"""Train Style LoRA on ComfyUI's web canvas, in headless Chromium: a person finds the node with the Node Library's
search, queues it, and watches its progress. Needs what tests/test_browser.py needs (COMFYUI_DIR, Chromium,
playwright); screenshots go to /tmp/canvas-train-*.png."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_browser import ARGS, CHROMIUM, HAVE_PLAYWRIGHT

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set"),
              pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM}"),
              pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="playwright is not installed")]

# What the page shows while the prompt runs: the tab title ("[50%][50%] TrainStyle" in frontend 1.27) and the bar the
# canvas draws along the running node's top edge (its `progress`, 0..1), sampled together.
SAMPLE_JS = """() => {
  const node = app.graph._nodes.find((n) => n.type === 'TrainStyle');
  return [document.title, node && node.progress !== undefined ? node.progress : null];
}"""


def test_train_style_is_found_on_the_canvas_and_its_bar_moves(comfy_server):
    from playwright.sync_api import sync_playwright

    base = comfy_server["base"]
    shutil.copytree(base / "paintings", base / "input" / "paintings", dirs_exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(comfy_server["url"])
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(3000)
        page.keyboard.press("Escape")  # the Templates browser, open on a first start
        page.evaluate("() => app.graph.clear()")
        # 1. The Node Library's search (the sidebar's Nodes tab), as a person looks for a node; a click adds it.
        search = page.get_by_placeholder("Search Nodes...").first
        if not search.is_visible():
            page.get_by_text("Nodes", exact=True).first.click()
        search.wait_for(timeout=10_000)
        search.fill("Train Style")
        option = page.get_by_text("Train Style LoRA (Stylora)").first
        try:
            option.wait_for(timeout=10_000)
        finally:
            page.screenshot(path="/tmp/canvas-train-search.png")
        assert option.is_visible()
        option.click()
        page.wait_for_timeout(800)
        assert page.evaluate("() => app.graph._nodes.map((n) => n.type)") == ["TrainStyle"]
        # 2. Small settings, queued as the Queue button does.
        page.evaluate("""() => {
            const node = app.graph._nodes[0];
            const values = {ckpt_name: 'sd15.safetensors', folder: 'paintings', name: 'browser_style', steps: 4,
                            resolution: 64};
            for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
        }""")
        with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as reply:
            page.evaluate("async () => { await app.queuePrompt(0, 1); }")
        assert reply.value.status == 200, reply.value.text()
        prompt_id = reply.value.json()["prompt_id"]
        # 3. What the page shows while it trains, sampled until the prompt is in the history.
        samples, start, status = [], time.monotonic(), None
        while status is None:
            assert time.monotonic() - start < 900, f"prompt {prompt_id} did not finish"
            samples.append(tuple(page.evaluate(SAMPLE_JS)))
            if len(samples) % 20 == 10:
                page.screenshot(path="/tmp/canvas-train-running.png")
            status = page.evaluate("async (id) => (await (await fetch(`/api/history/${id}`)).json())[id]?.status",
                                   prompt_id)
            page.wait_for_timeout(150)
        browser.close()
    assert status["status_str"] == "success", status
    bars = [p for _, p in samples if p is not None]
    titles = [t for t, _ in samples if "TrainStyle" in t]
    # The node's bar moved through the steps (quarters of 4 steps), never backwards, and the tab title said so.
    moved = sorted(set(bars))
    assert len(moved) >= 2 and moved[-1] > moved[0] and set(moved) <= {0.0, 0.25, 0.5, 0.75, 1.0}, samples
    assert bars == sorted(bars), bars
    assert any("[25%] TrainStyle" in t or "[50%] TrainStyle" in t or "[75%] TrainStyle" in t for t in titles), titles
    assert (base / "models" / "styles" / "browser_style.safetensors").is_file()
