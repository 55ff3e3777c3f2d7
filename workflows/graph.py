"""The workflow graph model and its two ComfyUI formats.

A workflow is a list of `Node`s whose inputs are wired to other nodes' outputs BY NAME (`(1, "MODEL")`: node 1's
output called MODEL in its schema's `output_name`). Widget order, link types and output slots come from the node
schema: ComfyUI's /object_info for the core nodes and our own node declarations (`our_schema`), so the UI format
(drag onto the canvas) and the API format (POST to /prompt) cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..nodes import NODE_CLASS_MAPPINGS

LINK_FREE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}  # widget types; a list (combo) is a widget too
UI_ONLY_TYPES = {"Note", "MarkdownNote"}  # frontend nodes: no schema, not in API format
TITLE_H = 30  # the frontend draws a node's title bar above its pos
GAP = 40  # between nodes, vertically and horizontally
GROWS = {"StyleMetrics": 320}  # extra height a node takes after a run (Style Metrics' text), kept free below it


def our_schema() -> dict[str, dict]:
    """Our nodes as /object_info would list them (style lists are empty without a server)."""
    out = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        out[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                     "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES),
                     "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return out


def is_widget(spec: list) -> bool:
    """Whether an input spec (`[type, options]`) is a widget (a value typed on the node) rather than a socket."""
    kind = spec[0]
    return isinstance(kind, list) or kind in LINK_FREE_TYPES


def widget_names(entry: dict) -> list[str]:
    """Names of a node's widget inputs in the order of its widgets_values (required, then optional)."""
    names = []
    for group in ("required", "optional"):
        for name in entry.get("input_order", {}).get(group, entry["input"].get(group, {})):
            if is_widget(entry["input"][group][name]):
                names.append(name)
    return names


def input_spec(entry: dict, name: str) -> list | None:
    """The `[type, options]` spec of input `name` (required or optional), or None when the node has no such input."""
    for group in ("required", "optional"):
        if name in entry["input"].get(group, {}):
            return entry["input"][group][name]
    return None


def output_slot(schema: dict[str, dict], node_type: str, output: str) -> int:
    """The slot number of `node_type`'s output called `output` (its schema's output_name, else its types)."""
    names = schema[node_type].get("output_name", schema[node_type]["output"])
    if output not in names:
        raise KeyError(f"node type {node_type} has no output {output!r}; its outputs: {list(names)}")
    return list(names).index(output)


@dataclass
class Node:
    id: int
    type: str
    title: str
    values: dict[str, Any] = field(default_factory=dict)  # widget values (defaults from the schema otherwise)
    links: dict[str, tuple[int, str]] = field(default_factory=dict)  # input name -> (source node id, output name)
    size: tuple[int, int] = (320, 130)
    pos: tuple[int, int] = (0, 0)  # set by `layout`


def note(id_: int, text: str, size: tuple[int, int] = (420, 300)) -> Node:
    """A frontend Note node (UI format only) titled "How to use"."""
    return Node(id_, "Note", "How to use", {"text": text}, size=size)


def _default(spec: list) -> Any:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _slots(nodes: list[Node], schema: dict[str, dict]) -> dict[tuple[int, str], int]:
    """(target node id, input name) -> the source's output slot, for every link of the graph."""
    by_id = {n.id: n for n in nodes}
    return {(n.id, name): output_slot(schema, by_id[src].type, output)
            for n in nodes for name, (src, output) in n.links.items()}


def to_api(nodes: list[Node], schema: dict[str, dict]) -> dict[str, dict]:
    """The API format (POST /prompt): {node id: {class_type, inputs, _meta.title}}, a link as [source id, slot]."""
    slots = _slots(nodes, schema)
    api = {}
    for n in nodes:
        if n.type in UI_ONLY_TYPES:
            continue
        entry = schema[n.type]
        inputs: dict[str, Any] = {}
        for name in widget_names(entry):
            if name not in n.links:
                inputs[name] = n.values.get(name, _default(input_spec(entry, name)))
        for name, (src, _) in n.links.items():
            inputs[name] = [str(src), slots[n.id, name]]
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title}}
    return api


def _ui_inputs(n: Node, entry: dict, links: list[list]) -> list[dict]:
    """A UI node's input sockets: every linked input and every non-widget input, in schema order."""
    inputs = []
    for group in ("required", "optional"):
        for name in entry.get("input_order", {}).get(group, entry["input"].get(group, {})):
            spec = entry["input"][group][name]
            link = next((lk for lk in links if lk[3] == n.id and lk[4] == name), None)
            if is_widget(spec) and link is None:
                continue
            item = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0],
                    "link": link[0] if link else None}
            if is_widget(spec):
                item["widget"] = {"name": name}
            inputs.append(item)
    return inputs


def _ui_widget_values(n: Node, entry: dict) -> list:
    """A UI node's widgets_values: each widget's value, plus the frontend's extra entries (seed control, upload)."""
    values = []
    for name in widget_names(entry):
        spec = input_spec(entry, name)
        values.append(n.values.get(name, _default(spec)))
        if len(spec) > 1 and spec[1].get("control_after_generate"):
            values.append("fixed")
        if len(spec) > 1 and spec[1].get("image_upload"):
            values.append("image")
    return values


def to_ui(nodes: list[Node], schema: dict[str, dict], model_files: dict[str, dict] | None = None) -> dict[str, Any]:
    """The UI format (the canvas; ComfyUI's Templates browser). `model_files`: public files by name, carried on the
    node whose widget names one (`properties.models`), as ComfyUI's own templates do."""
    # 1. The links, in the order the nodes name them: [id, source, slot, target, input name (index later), type].
    by_id = {n.id: n for n in nodes}
    slots = _slots(nodes, schema)
    links = []
    for n in nodes:
        for name, (src, _) in n.links.items():
            slot = slots[n.id, name]
            links.append([len(links) + 1, src, slot, n.id, name, schema[by_id[src].type]["output"][slot]])
    # 2. The nodes: notes as they are, the others with their sockets, outputs and widget values.
    ui_nodes = []
    for order, n in enumerate(nodes):
        common = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                  "order": order, "mode": 0}
        if n.type in UI_ONLY_TYPES:
            ui_nodes.append({**common, "inputs": [], "outputs": [], "title": n.title, "properties": {},
                             "widgets_values": [n.values["text"]]})
            continue
        entry = schema[n.type]
        outputs = [{"name": entry.get("output_name", entry["output"])[slot], "type": kind,
                    "links": [lk[0] for lk in links if lk[1] == n.id and lk[2] == slot], "slot_index": slot}
                   for slot, kind in enumerate(entry["output"])]
        ui_nodes.append({**common, "inputs": _ui_inputs(n, entry, links), "outputs": outputs, "title": n.title,
                         "properties": node_properties(n, model_files or {}),
                         "widgets_values": _ui_widget_values(n, entry)})
    # 3. The UI format names a link's target slot by its index among the target's inputs.
    for lk in links:
        target = next(u for u in ui_nodes if u["id"] == lk[3])
        lk[4] = next(i for i, item in enumerate(target["inputs"]) if item["name"] == lk[4])
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


def node_properties(n: Node, model_files: dict[str, dict]) -> dict[str, Any]:
    """A UI node's properties: its search name and the public model files its widgets name."""
    models = [model_files[v] for v in n.values.values() if isinstance(v, str) and v in model_files]
    return {"Node name for S&R": n.type, **({"models": models} if models else {})}


def layout(*columns: list[Node]) -> list[Node]:
    """Place columns of nodes left to right, each stacked top to bottom, so no two nodes overlap: title bars
    included, and the room a node grows into after a run (GROWS) left free below it. Returns all nodes."""
    x, out = 0, []
    for column in columns:
        y = 0
        for n in column:
            n.pos = (x, y + TITLE_H)
            y += TITLE_H + n.size[1] + GROWS.get(n.type, 0) + GAP
        x += max(n.size[0] for n in column) + GAP
        out += column
    return out
