"""The pack on ComfyUI's web canvas, in headless Chromium: what a person meets first.

Needs COMFYUI_DIR (a real ComfyUI, see test_comfyui.py for its other variables), Chromium at /usr/bin/chromium
(Debian package `chromium`) and the `playwright` Python package (no `playwright install`: the system Chromium is
used). Screenshots go to /tmp/canvas-<frontend>-*.png.

Every test runs in three frontends a person meets: 1.27 (the one ComfyUI 0.3.64 pins, on the session's server), and
the newest (COMFYUI_FRONTEND_ROOT: the `static` folder of the `comfyui-frontend-package` wheel, served by a second
ComfyUI on the same base folder through --front-end-root) with its canvas renderer and with its Vue node renderer
("Nodes 2.0", setting Comfy.VueNodes.Enabled). Known limit: frontend 1.5x on a 0.3.64 backend shows empty Job Queue
and Assets panels (it asks /api/jobs, which 0.3.64 does not have); the tests read /api/history instead.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, comfyui_process

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

FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT", "")  # the newest frontend's static folder
# (frontend, renderer): the pinned frontend, then the newest with its canvas and with its Vue node renderer.
CONFIGS = [("1.27", "canvas"), ("new", "canvas"), ("new", "vue")]
NAMES = ["style_transfer", "masked_style", "style_blend", "style_metrics", "style_from_image", "layout_guard",
         "dreambooth", "textual_inversion", "train_style"]

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
def new_frontend_server(comfy_server, tmp_path_factory):
    """A second ComfyUI on the session server's base folder (same pack, models and inputs) serving the newest
    frontend, with its own user folder (settings) and temp folder; started once for both of its renderers. The
    session server is asked to drop its loaded models first, so two servers fit in memory."""
    if not FRONTEND_ROOT or not (Path(FRONTEND_ROOT) / "index.html").is_file():
        pytest.skip(f"COMFYUI_FRONTEND_ROOT={FRONTEND_ROOT!r} is not a frontend's static folder (see .ci/run)")
    free = urllib.request.Request(comfy_server["url"] + "/free", method="POST",
                                  data=json.dumps({"unload_models": True, "free_memory": True}).encode())
    urllib.request.urlopen(free, timeout=30)
    user, temp = tmp_path_factory.mktemp("user-new-frontend"), tmp_path_factory.mktemp("temp-new-frontend")
    with comfyui_process(comfy_server["base"], "--front-end-root", FRONTEND_ROOT, "--user-directory", str(user),
                         "--temp-directory", str(temp), log_name="server-new-frontend.log") as url:
        yield {**comfy_server, "url": url}


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"{f}-{r}" for f, r in CONFIGS])
def canvas(request, comfy_server):
    """A Chromium page on the server's canvas in one (frontend, renderer) configuration, with the example inputs
    uploaded and a style whose weights overflow to inf (finite in the file, as a diverged training can leave
    them): its images are NaN."""
    from playwright.sync_api import sync_playwright
    from safetensors.torch import save_file
    from stylora.core.lora_file import read_lora

    frontend, renderer = request.param
    server = comfy_server if frontend == "1.27" else request.getfixturevalue("new_frontend_server")
    base = server["base"]
    for name in ("stylora_content.jpg", "stylora_content_masked.png", "stylora_style.jpg"):
        shutil.copy(REPO / "examples" / name, base / "input" / name)
    state, meta = read_lora(base / "models" / "styles" / "mystyle.safetensors")
    huge = {k: torch.full(v.shape, 1e30 if not k.endswith(".alpha") else 4.0) for k, v in state.items()}
    save_file(huge, str(base / "models" / "styles" / "overflow.safetensors"), metadata=meta)
    if frontend != "1.27":  # the renderer is a user setting, read when the page loads
        setting = urllib.request.Request(server["url"] + "/api/settings/Comfy.VueNodes.Enabled", method="POST",
                                         data=json.dumps(renderer == "vue").encode())
        urllib.request.urlopen(setting, timeout=30)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server["url"])
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(3000)
        vue = page.evaluate("() => !!app.ui?.settings?.getSettingValue?.('Comfy.VueNodes.Enabled')")
        assert vue == (renderer == "vue")
        if frontend == "1.27":
            templates = _templates_browser(page)
        else:  # the newest opens its own Templates dialog on a first start (the pack's under Extensions): closed
            templates = []
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
        yield {"page": page, "errors": errors, "url": server["url"], "templates": templates,
               "name": f"{frontend}-{renderer}", "vue": renderer == "vue"}
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
    page.screenshot(path=f"/tmp/canvas-{canvas['name']}-{name}.png")


def _small_run(model_style: str) -> dict[str, dict]:
    return {"Checkpoint": {"ckpt_name": "sd15.safetensors"}, "Style": {"style": model_style},
            "Content encode": {"max_side": 64}, "Sampler": {"steps": 1}}


# What a person sees in Style Metrics' text box: the textarea on the page (in the Vue renderer: inside the node's own
# [data-node-id] element; on the canvas: the widget's element, attached to the document), whether it is displayed,
# and whether its whole text fits without scrolling. A value held by a widget but not on the page reads as not shown.
METRICS_BOX_JS = """() => {
  const node = app.graph._nodes.find((n) => n.type === 'StyleMetrics');
  const root = document.querySelector(`[data-node-id="${node.id}"]`);
  const boxes = root ? [...root.querySelectorAll('textarea')]
    : (node.widgets || []).map((w) => w.element).filter((e) => e instanceof HTMLTextAreaElement);
  const shown = boxes.filter((e) => e.isConnected && e.getClientRects().length > 0
    && getComputedStyle(e).visibility !== 'hidden' && e.getBoundingClientRect().height > 0);
  const box = shown.find((e) => e.value) || shown[0];
  return {vue: !!root, boxes: boxes.length, shown: shown.length, text: box ? box.value : '',
          fits: box ? box.scrollHeight <= box.clientHeight + 2 : false,
          node_text: root ? root.innerText : '', widget_names: (node.widgets || []).map((w) => w.name)};
}"""


def _metrics_box(page) -> dict:
    return page.evaluate(METRICS_BOX_JS)


def test_style_metrics_runs_and_shows_its_text_on_the_node(canvas):
    page = canvas["page"]
    _open(page, "style_metrics")
    _set(page, _small_run("mystyle.safetensors"))
    status = _run(page)
    assert status["status_str"] == "success", status
    box = _metrics_box(page)
    assert box["vue"] == canvas["vue"]  # in the Vue renderer the node is a DOM element of its own
    assert box["shown"] == 1, box  # one text box, displayed on the page
    text = box["text"]
    assert text.startswith("1 image(s)\nssim: ") and "lpips: n/a (alexnet-owt-7be5be79.pth missing" in text, box
    assert box["fits"], box  # every line visible without scrolling
    # No raw widget name as a label (the Vue renderer labels each widget): the box is labelled for a person.
    assert "metrics" not in box["node_text"].split("\n") and "stylora_metrics_text" not in box["node_text"], box
    assert page.evaluate(OVERLAPS_JS) == []  # the node grew into the room left below it
    page.screenshot(path=f"/tmp/canvas-{canvas['name']}-style_metrics-run.png")
    if canvas["vue"]:  # the node alone, as a person sees it
        node_id = page.evaluate("() => app.graph._nodes.find((n) => n.type === 'StyleMetrics').id")
        page.locator(f'[data-node-id="{node_id}"]').screenshot(path="/tmp/canvas-new-vue-style_metrics-node.png")


def test_nan_metrics_leave_the_queue_panel_working(canvas):
    page = canvas["page"]
    _open(page, "style_metrics")
    _set(page, _small_run("overflow.safetensors"))
    status = _run(page)
    assert status["status_str"] == "success", status
    text = _metrics_box(page)["text"]
    assert "ssim: n/a (not a finite number" in text and "NaN" not in text.replace("NaN/inf", "")
    # What the Queue panel reads: the history must parse as JSON (Python's NaN would not).
    history = page.evaluate("async () => JSON.stringify(await (await fetch('/api/history?max_items=64')).json())")
    assert len(json.loads(history)) >= 2
    page.screenshot(path=f"/tmp/canvas-{canvas['name']}-style_metrics-nan.png")


def test_templates_open_where_the_host_answers_404_for_thumbnails(canvas):
    """A host that serves only a template folder's .json files (a change under review in ComfyUI) answers 404 for
    examples/*.jpg: the cards lose their pictures, nothing else. Every template still opens, whole, without an
    error from the pack."""
    page = canvas["page"]
    page.route("**/workflow_templates/stylora/*.jpg", lambda route: route.fulfill(status=404, body="Not Found"))
    try:
        before = len(canvas["errors"])
        for name in NAMES:
            status = page.evaluate("async (n) => (await fetch(`/api/workflow_templates/stylora/${n}.jpg`)).status",
                                   name)
            assert status == 404
            _open(page, name)
            types = page.evaluate("() => app.graph._nodes.map((n) => n.type)")
            assert types and all(page.evaluate("(t) => !!LiteGraph.registered_node_types[t]", t) for t in types)
        new_errors = canvas["errors"][before:]
        assert [e for e in new_errors if "404" not in e and "stylora" in e.lower()] == []
    finally:
        page.unroute("**/workflow_templates/stylora/*.jpg")
