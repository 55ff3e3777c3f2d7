"""Every bundled workflow checked offline against ComfyUI 0.3.64's real core-node schema plus our declarations:
node types exist, required inputs are present with the right type or a link of the right type, links are
consistent, and the UI and API files describe the same graph."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import CORE_NODES, REPO
from stylora.workflows import definitions, graph

SHARED_OBJECT_INFO = REPO.parent / "shared" / "comfyui" / "object_info-0.3.64.json"
FILE_LISTS = {"ckpt_name", "image", "style", "style_2", "style_3"}  # options depend on the server's files



@pytest.fixture(scope="module")
def schema() -> dict:
    """/object_info of ComfyUI 0.3.64 (../shared when present, else the trimmed copy of its facts) + our nodes."""
    path = SHARED_OBJECT_INFO if SHARED_OBJECT_INFO.is_file() else CORE_NODES
    return {**json.loads(path.read_text()), **graph.our_schema()}


def check_value(node: str, name: str, spec: list, value) -> list[str]:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    where = f"node {node} input {name}"
    if isinstance(kind, list):
        if not isinstance(value, str):
            return [f"{where}: {value!r} is not a string"]
        if kind and name not in FILE_LISTS and value not in kind:
            return [f"{where}: {value!r} is not one of {kind[:8]}"]
        return []
    py = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, py) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return [f"{where}: {value!r} is not {kind}"]
    if kind in ("INT", "FLOAT") and not (opts.get("min", value) <= value <= opts.get("max", value)):
        return [f"{where}: {value} outside {opts.get('min')}..{opts.get('max')}"]
    return []


def check_api(api: dict, schema: dict) -> list[str]:
    problems = []
    for node_id, node in api.items():
        entry = schema.get(node["class_type"])
        if entry is None:
            problems.append(f"node {node_id}: unknown type {node['class_type']}")
            continue
        for group in ("required", "optional"):
            for name, spec in entry["input"].get(group, {}).items():
                if name not in node["inputs"]:
                    if group == "required":
                        problems.append(f"node {node_id} ({node['class_type']}): required input {name} missing")
                    continue
                value = node["inputs"][name]
                if isinstance(value, list):  # a link: [source id, output slot]
                    src = api.get(value[0])
                    if src is None or src["class_type"] not in schema:
                        problems.append(f"node {node_id} input {name}: links to missing or unknown node {value[0]}")
                        continue
                    out_types = schema[src["class_type"]]["output"]
                    want = "COMBO" if isinstance(spec[0], list) else spec[0]
                    if value[1] >= len(out_types):
                        problems.append(f"node {node_id} input {name}: node {value[0]} has no output {value[1]}")
                    elif out_types[value[1]] != want and "*" not in (want, out_types[value[1]]):
                        problems.append(f"node {node_id} input {name}: wants {want}, gets {out_types[value[1]]}")
                elif graph.is_widget(spec):
                    problems += check_value(node_id, name, spec, value)
                else:
                    problems.append(f"node {node_id} input {name}: {spec[0]} must be a link, got {value!r}")
        known = {n for g in entry["input"].values() for n in g}
        problems += [f"node {node_id}: unknown input {n}" for n in node["inputs"] if n not in known]
    return problems


def check_ui(ui: dict, schema: dict) -> list[str]:
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {lk[0]: lk for lk in ui["links"]}
    if ui["last_node_id"] < max(nodes) or ui["last_link_id"] < max(links, default=0):
        problems.append("last_node_id/last_link_id below the ids in use")
    for lk in ui["links"]:
        link_id, src, src_slot, dst, dst_slot, kind = lk
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: missing node")
            continue
        if src_slot >= len(nodes[src]["outputs"]) or dst_slot >= len(nodes[dst]["inputs"]):
            problems.append(f"link {link_id}: no slot {src_slot} on node {src} or {dst_slot} on node {dst}")
            continue
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        if link_id not in out["links"] or inp["link"] != link_id:
            problems.append(f"link {link_id}: not recorded on both ends")
        if out["type"] != kind or (inp["type"] != kind and inp["type"] != "*"):
            problems.append(f"link {link_id}: type {kind} vs output {out['type']} / input {inp['type']}")
    for n in ui["nodes"]:
        if n["type"] in graph.UI_ONLY_TYPES:
            continue
        entry = schema.get(n["type"])
        if entry is None:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        expected = 0
        for name in graph.widget_names(entry):
            spec = graph.input_spec(entry, name)
            expected += 1 + bool(len(spec) > 1 and (spec[1].get("control_after_generate")
                                                    or spec[1].get("image_upload")))
        if len(n["widgets_values"]) != expected:
            problems.append(f"node {n['id']} ({n['type']}): {len(n['widgets_values'])} widget values, "
                            f"schema has {expected}")
        linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
        for name, spec in entry["input"].get("required", {}).items():
            if not graph.is_widget(spec) and name not in linked:
                problems.append(f"node {n['id']} ({n['type']}): required input {name} not linked")
        for slot, out in enumerate(n["outputs"]):
            if out["type"] != entry["output"][slot]:
                problems.append(f"node {n['id']} output {slot}: {out['type']} vs schema {entry['output'][slot]}")
    return problems


def ui_to_api(ui: dict, schema: dict) -> dict:
    """What the frontend would queue for a UI-format workflow (widget values by name, links as [id, slot])."""
    api = {}
    for n in ui["nodes"]:
        if n["type"] in graph.UI_ONLY_TYPES:
            continue
        entry = schema[n["type"]]
        values = iter(n["widgets_values"])
        inputs = {}
        for name in graph.widget_names(entry):
            spec = graph.input_spec(entry, name)
            inputs[name] = next(values)
            if len(spec) > 1 and (spec[1].get("control_after_generate") or spec[1].get("image_upload")):
                next(values)
        for i in n["inputs"]:
            if i["link"] is not None:
                lk = next(lk for lk in ui["links"] if lk[0] == i["link"])
                inputs[i["name"]] = [str(lk[1]), lk[2]]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", "")}}
    return api


NAMES = sorted(definitions.WORKFLOWS)


def test_every_workflow_exists_in_both_formats_and_nothing_else_is_listed():
    assert sorted(p.stem for p in (REPO / "examples").glob("*.json")) == NAMES
    assert sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json")) == NAMES
    # ComfyUI 0.3.64 lists *.json directly in every template folder but serves only examples/ (the first present).
    assert not list((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_valid_against_the_schema(name, schema):
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    ui = json.loads((REPO / "examples" / f"{name}.json").read_text())
    assert check_api(api, schema) == []
    assert check_ui(ui, schema) == []
    assert ui_to_api(ui, schema) == api  # the two formats are the same graph
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and "stylora run" in notes[0]["widgets_values"][0]
    for node in api.values():  # example inputs ship in examples/
        if node["class_type"] == "LoadImage":
            assert (REPO / "examples" / node["inputs"]["image"]).is_file()


def test_committed_files_are_what_the_builder_writes(schema):
    """Byte for byte, as tools/build_workflows.py writes them (json, indent 1, one newline)."""
    for name, make in definitions.WORKFLOWS.items():
        nodes = make()
        ui = definitions.ui_workflow(name, schema)
        assert (REPO / "examples" / f"{name}.json").read_text() == json.dumps(ui, indent=1) + "\n"
        assert ui["nodes"] == graph.to_ui(nodes, schema, definitions.MODEL_FILES)["nodes"]
        api = (REPO / "workflows" / "api" / f"{name}.json").read_text()
        assert api == json.dumps(graph.to_api(nodes, schema), indent=1) + "\n"


def test_a_workflow_is_the_same_whatever_was_built_before_it(schema):
    """No definition changes another's nodes (a shared dict once gave train_style the baselines' CFG 5)."""
    alone = {name: graph.to_api(make(), schema) for name, make in definitions.WORKFLOWS.items()}
    for name in reversed(list(definitions.WORKFLOWS)):
        assert graph.to_api(definitions.WORKFLOWS[name](), schema) == alone[name], name
    samplers = {name: next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
                for name, api in alone.items()}
    # CFG 1 for the promptless styles; the baselines sample with their prompt (Ruiz et al. 2023; Gal et al. 2023).
    assert {name: s["cfg"] for name, s in samplers.items()} == {
        **{name: 1.0 for name in samplers}, "dreambooth": 7.0, "textual_inversion": 5.0}
    assert samplers["dreambooth"]["denoise"] == samplers["textual_inversion"]["denoise"] == 0.6


def test_links_are_wired_by_output_name(schema):
    """A link names the source's output; its slot comes from the schema (ContentEncode: latent 0, image 1, mask 3)."""
    nodes = [graph.Node(6, "LoadImage", "Content", {"image": "a.png"}),
             graph.Node(7, "ContentEncode", "Encode", {}, {"image": (6, "IMAGE"), "mask": (6, "MASK")}),
             graph.Node(20, "KeepPhotoColours", "Keep", {}, {"content": (7, "image"), "styled": (7, "image")})]
    api = graph.to_api(nodes, schema)
    assert api["7"]["inputs"]["image"] == ["6", 0] and api["7"]["inputs"]["mask"] == ["6", 1]
    assert api["20"]["inputs"]["content"] == ["7", 1]
    ui = graph.to_ui(nodes, schema)
    assert [lk[1:3] + [lk[5]] for lk in ui["links"]] == [[6, 0, "IMAGE"], [6, 1, "MASK"], [7, 1, "IMAGE"],
                                                        [7, 1, "IMAGE"]]
    nodes[2].links["styled"] = (7, "styled")
    with pytest.raises(KeyError, match="ContentEncode has no output 'styled'; its outputs: .*'latent', 'image'"):
        graph.to_api(nodes, schema)


def test_the_core_node_fixture_is_the_trim_of_the_saved_object_info():
    """tests/fixtures/core_nodes-0.3.64.json: what the builder trims from ComfyUI 0.3.64's /object_info for the core
    nodes the workflows use (skipped without ../shared, the full file being the source)."""
    if not SHARED_OBJECT_INFO.is_file():
        pytest.skip(f"no {SHARED_OBJECT_INFO}")
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "tools" / "build_workflows.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    object_info = json.loads(SHARED_OBJECT_INFO.read_text())
    used = {n.type for make in definitions.WORKFLOWS.values() for n in make() if n.type in object_info}
    assert CORE_NODES.read_text() == json.dumps(tool.trimmed(object_info, used), indent=1) + "\n"


TITLE_H = 30  # the frontend draws the title bar above a node's pos
GROWTH = {"StyleMetrics": 300}  # its text area after a run (stylora.js makes it at least 260 px tall, then text)


def boxes(ui: dict) -> dict[str, tuple[float, float, float, float]]:
    """Each node's rectangle on the canvas (left, top, right, bottom): its title bar above `pos` included, and the
    room below a node that grows after a run (Style Metrics' text)."""
    out = {}
    for n in ui["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        out[f"{n['id']} {n['title']}"] = (x, y - TITLE_H, x + w, y + h + GROWTH.get(n["type"], 0))
    return out


def overlaps(ui: dict) -> list[str]:
    rects = sorted(boxes(ui).items())
    return [f"{a} overlaps {b}" for i, (a, ra) in enumerate(rects) for b, rb in rects[i + 1:]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]]


@pytest.mark.parametrize("name", NAMES)
def test_templates_have_a_thumbnail_a_description_and_no_overlapping_nodes(name):
    ui = json.loads((REPO / "examples" / f"{name}.json").read_text())
    assert overlaps(ui) == []
    description = ui["extra"]["stylora"]["description"]
    assert len(description) > 30 and "\n" not in description and name not in description
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes[0]["widgets_values"][0].startswith(description)
    from PIL import Image

    with Image.open(REPO / "examples" / f"{name}.jpg") as thumb:  # served as /api/workflow_templates/stylora/<name>.jpg
        assert thumb.format == "JPEG" and thumb.width == 256 and thumb.height < 256
    assert ui["extra"]["stylora"]["order"] == list(definitions.WORKFLOWS).index(name) + 1


def test_overlap_check_sees_title_bars_and_growth():
    ui = json.loads((REPO / "examples" / "style_metrics.json").read_text())
    metrics = next(n for n in ui["nodes"] if n["type"] == "StyleMetrics")
    below = {"id": 99, "title": "x", "type": "Note", "pos": [metrics["pos"][0], metrics["pos"][1] + metrics["size"][1]
                                                             + TITLE_H + 10], "size": [100, 50]}
    assert overlaps({"nodes": ui["nodes"] + [below]}) == ["13 Metrics overlaps 99 x"]  # inside its growth room
    beside = dict(below, pos=[metrics["pos"][0] + metrics["size"][0] + 1, metrics["pos"][1]])
    assert overlaps({"nodes": [metrics, beside]}) == []


def test_validator_catches_broken_workflows(schema):
    api = json.loads((REPO / "workflows" / "api" / "style_transfer.json").read_text())
    broken = json.loads(json.dumps(api))
    broken["8"]["inputs"].pop("model")
    broken["8"]["inputs"]["sampler_name"] = "not-a-sampler"
    broken["9"]["inputs"]["samples"] = ["5", 0]  # CONDITIONING into a LATENT input
    broken["7"]["class_type"] = "ContentEncodeV2"
    problems = check_api(broken, schema)
    assert any("required input model missing" in p for p in problems)
    assert any("not-a-sampler" in p for p in problems)
    assert any("wants LATENT, gets CONDITIONING" in p for p in problems)
    assert any("unknown type ContentEncodeV2" in p for p in problems)
    ui = json.loads((REPO / "examples" / "style_transfer.json").read_text())
    ui["nodes"][7]["widgets_values"].pop()
    ui["links"][0][2] = 2
    problems = check_ui(ui, schema)
    assert any("widget values" in p for p in problems) and any(p.startswith("link 1:") for p in problems)


# The public files the templates name: folder under ComfyUI/models and the download address (without the name).
PUBLIC_FILES = {
    "v1-5-pruned-emaonly.safetensors":
        ("checkpoints", "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"),
    "control_v11p_sd15_canny_fp16.safetensors":
        ("controlnet", "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"),
}


def test_templates_name_the_public_model_files_and_say_what_the_placeholders_are():
    """Each loader that names a public file carries it as ComfyUI's own templates do (properties.models: name, url,
    directory), so frontend 1.5x's missing-models dialog offers the download; the files a person trains are
    named as such."""
    for path in sorted((REPO / "examples").glob("*.json")):
        ui = json.loads(path.read_text())
        for node in (n for n in ui["nodes"] if n["type"] not in graph.UI_ONLY_TYPES):
            names = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
            public = [v for v in names if v in PUBLIC_FILES]
            assert node["properties"].get("models", []) == [
                {"name": v, "directory": PUBLIC_FILES[v][0], "url": PUBLIC_FILES[v][1] + v}
                for v in public], (path.name, node["title"])
            for v in names:
                assert v in public or "(stylora train" in v or v == "None", (path.name, node["title"], v)
    assert "(stylora train lora)" in definitions.STYLE_PLACEHOLDER


def test_schema_defaults_and_bare_specs():
    """/object_info may give a spec without options (["INT"]): a widget then takes the type's zero, a combo its first
    choice, and the frontend's extra widget values (seed control, upload button) only come with their option."""
    schema = {"T": {"input": {"required": {"n": ["INT"], "x": ["FLOAT"], "s": ["STRING"], "b": ["BOOLEAN"],
                                           "c": [["first", "second"]], "e": [[]], "m": ["MODEL"]},
                              "optional": {"seed": ["INT", {"control_after_generate": True}],
                                           "img": [["a.png"], {"image_upload": True}]}},
                    "output": ["MODEL"], "output_name": ["model"]}}
    nodes = [graph.Node(1, "T", "t", {"s": "set"})]
    assert graph.to_api(nodes, schema)["1"]["inputs"] == {"n": 0, "x": 0.0, "s": "set", "b": False, "c": "first",
                                                          "e": "", "seed": 0, "img": "a.png"}
    ui = graph.to_ui(nodes, schema)["nodes"][0]
    assert ui["widgets_values"] == [0, 0.0, "set", False, "first", "", 0, "fixed", "a.png", "image"]
    assert [i["name"] for i in ui["inputs"]] == ["m"] and ui["properties"] == {"Node name for S&R": "T"}
    ours = graph.our_schema()
    assert {name for name, entry in ours.items() if entry["output_node"] is True} == {"StyleMetrics", "TrainStyle"}
    assert all(entry["output_node"] is False for name, entry in ours.items() if name not in ("StyleMetrics",
                                                                                             "TrainStyle"))


def test_layout_stacks_columns_and_keeps_the_growth_room_free():
    """Column by column, left to right: a node's pos is below its title bar (30 px); the next node starts 40 px below
    it, and below Style Metrics' 320 px growth room; the next column starts 40 px right of the widest node."""
    metrics, below = graph.Node(1, "StyleMetrics", "m", size=(420, 170)), graph.Node(2, "Note", "n", size=(100, 50))
    right = graph.Node(3, "Note", "r", size=(200, 60))
    assert graph.layout([metrics, below], [right]) == [metrics, below, right]
    assert (metrics.pos, below.pos, right.pos) == ((0, 30), (0, 30 + 170 + 320 + 40 + 30), (420 + 40, 30))
