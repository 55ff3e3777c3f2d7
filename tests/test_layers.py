"""The package's layers point down: every import of the pack's own code, at module level or inside a function,
goes to a lower layer (or stays inside its own), and no two modules import each other, directly or round a loop.

LAYERS below is the one place the order is written. A module's layer is its first package under `stylora`
(`stylora.eval.report` -> eval); `stylora/__init__.py` is ComfyUI's entry and sits on top with the CLI.
Layers on the same tier are siblings and do not import each other.

Imports of the pack's own code belong at the top of the module. One inside a function is allowed only when it
is marked `# heavy: <why>` (on its line or the line above): it defers a heavy optional dependency (diffusers,
peft, accelerate) so that something light (e.g. `stylora --help`) stays fast.

Nodes never reach into the trainer, with one exception (TRAINER_GATE): the Train Style LoRA node's module may import
the trainer in exactly one marked function-level import, so listing the nodes in ComfyUI never loads it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "stylora"

# Lowest first; a module may import its own layer and layers on lower tiers only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("eval", "data"),
    ("trainer", "baseline"),
    ("nodes",),
    ("workflows",),
    ("study",),
    ("cli", "__init__"),
)
# On top of the tier order: nodes sit on core and eval only; they never reach into the trainer...
FORBIDDEN = {("nodes", "trainer")}
# ...except this one module, through exactly one marked import inside a function (see the module docstring).
TRAINER_GATE = "stylora.nodes.training"
NOT_PACKAGE = {"tests", "benchmarks", ".venv", ".git", ".ci", "examples"}
TIER = {layer: tier for tier, layers in enumerate(LAYERS) for layer in layers}


def pack_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the pack under `root`: the root's modules and its
    top-level packages (folders with an __init__.py; virtual environments, caches and the like have none)."""
    out = {}
    tops = [p for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()]
    for path in sorted(f for top in tops if top.name not in NOT_PACKAGE
                       for f in ([top] if top.is_file() else top.rglob("*.py"))):
        rel = path.relative_to(root)
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool, bool]]:
    """(imported pack module, line, inside a function, marked heavy) for each import of the pack's code."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []

    def marked(lineno: int) -> bool:
        return any("# heavy:" in lines[i - 1] for i in (lineno, lineno - 1) if i >= 1)

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = _package_of(module, path).split(".")
                    base = base[: len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                # `from . import backbones` imports a module; `from .metrics import ssim` a name of one.
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in child.names]
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    while target not in known and "." in target:  # `import stylora.x.y` of a name: its module
                        target = target.rpartition(".")[0]
                    found.append((target, child.lineno, in_function, marked(child.lineno)))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool, bool]]]]:
    modules = pack_modules(root)
    return modules, {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def violations(root: Path) -> list[str]:
    """Every upward, sibling or forbidden import, every unmarked function-level import of the pack's code, and
    every import cycle, as readable lines."""
    modules, graph = import_graph(root)
    problems = []
    for module, imports in graph.items():
        src = layer_of(module)
        where = modules[module].relative_to(root)
        gate_lines = sorted({line for target, line, *_ in imports if layer_of(target) == "trainer"})
        for target, line, in_function, heavy in imports:
            dst = layer_of(target)
            if in_function and not heavy:
                problems.append(f"{where}:{line}: imports {target} inside a function without a '# heavy:' reason")
            if dst == src:
                continue
            if (src, dst) == ("nodes", "trainer") and module == TRAINER_GATE:
                if not in_function or line != gate_lines[0]:
                    problems.append(f"{where}:{line}: {module} may import the trainer only once, inside a function "
                                    f"(a marked '# heavy:' import), not again here ({target})")
            elif (src, dst) in FORBIDDEN:
                problems.append(f"{where}:{line}: {src} must not import {dst} ({target})")
            elif TIER[dst] >= TIER[src]:
                problems.append(f"{where}:{line}: {src} imports {target}, which is not below it "
                                f"(layers, lowest first: {LAYERS})")
    for cycle in cycles({m: {t for t, *_ in imports if t != m} for m, imports in graph.items()}):
        problems.append("import cycle: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_every_module_has_a_layer():
    modules = pack_modules(REPO)
    assert {"stylora.cli", "stylora.core.files", "stylora.trainer.loop", "stylora.workflows.roles"} <= set(modules)
    assert {layer_of(m) for m in modules} <= set(TIER), sorted({layer_of(m) for m in modules} - set(TIER))


def test_imports_point_down_and_form_no_cycle():
    problems = violations(REPO)
    assert not problems, "\n".join(problems)


def _copy_pack(tmp_path: Path) -> Path:
    root = tmp_path / "pack"
    for path in pack_modules(REPO).values():
        target = root / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.mark.parametrize("file, line, expected", [
    ("core/files.py", "from ..eval import metrics\n", "core imports stylora.eval.metrics, which is not below it"),
    ("eval/metrics.py", "from ..data import prepare\n", "eval imports stylora.data.prepare, which is not below"),
    ("nodes/strength.py", "from ..trainer import config\n", "nodes must not import trainer"),
    ("core/images.py", "from .files import atomic_write\n", "import cycle: stylora.core.files -> stylora.core.images"),
    ("eval/weights.py", "def f():\n    from . import backbones\n", "inside a function without a '# heavy:' reason"),
    # only the training node reaches the trainer, and only once
    ("nodes/training.py", "from ..trainer import config\n", "may import the trainer only once, inside a function"),
    ("nodes/training.py", "def f():\n    # heavy: test\n    from ..trainer import loop\n",
     "may import the trainer only once"),
    ("nodes/training.py", "def f():\n    from ..trainer import loop\n", "without a '# heavy:' reason"),
    ("nodes/mask.py", "def f():\n    # heavy: test\n    from ..trainer import lora\n", "nodes must not import trainer"),
])
def test_a_bad_import_is_caught(tmp_path, file, line, expected):
    root = _copy_pack(tmp_path)
    assert not violations(root)
    path = root / file
    path.write_text(path.read_text(encoding="utf-8") + "\n" + line, encoding="utf-8")
    assert any(expected in p for p in violations(root)), violations(root)


def test_the_training_node_imports_the_trainer_once_inside_its_run():
    modules, graph = import_graph(REPO)
    gate = {(t, line, in_function, heavy) for t, line, in_function, heavy in graph[TRAINER_GATE]
            if layer_of(t) == "trainer"}
    assert len({line for _, line, *_ in gate}) == 1  # one import statement
    assert {(t, in_function, heavy) for t, _, in_function, heavy in gate} == {("stylora.trainer.lora", True, True)}
    others = [m for m, imports in graph.items() if layer_of(m) == "nodes" and m != TRAINER_GATE
              and any(layer_of(t) == "trainer" for t, *_ in imports)]
    assert others == []


def test_a_marked_heavy_import_inside_a_function_is_allowed(tmp_path):
    root = _copy_pack(tmp_path)
    path = root / "cli.py"
    deferred = "\n\ndef f():\n    # heavy: test\n    from .trainer import lora\n"
    path.write_text(path.read_text(encoding="utf-8") + deferred, encoding="utf-8")
    assert not violations(root)


# --- ComfyUI's internals: one module of the pack reaches them ---------------------------------------------------

# The modules that may import ComfyUI (`comfy`, `folder_paths`) or touch ModelPatcher's internals; every other module
# goes through nodes/host.py's functions.
HOST_ADAPTERS = (
    "stylora.nodes.host",
)
COMFY_PACKAGES = ("comfy", "folder_paths", "comfy_extras", "comfy_api", "nodes")
# ModelPatcher / CLIP / VAE / folder_paths fields and methods that are ComfyUI internals (not a stable API).
HOST_INTERNALS = frozenset({
    "patches", "patches_uuid", "model_options", "add_patches", "get_attachment", "set_attachments",
    "remove_attachments", "set_model_unet_function_wrapper", "set_model_attn1_replace", "set_model_attn1_patch",
    "patcher", "cond_stage_model", "model_config", "get_sd", "folder_names_and_paths",
    "get_full_path", "get_filename_list", "get_folder_paths", "models_dir", "filename_list_cache",
})
# A node module may import another node module only here: (importer, imported) and why.
NODE_TO_NODE = {
    ("stylora.nodes", "*"): "the package lists the nodes",
    ("stylora.nodes.help_pages", "stylora.nodes"): "the help pages are written for the registered nodes",
    ("stylora.nodes.training", "stylora.nodes.style_lora"): "a trained style comes back applied by Load Style LoRA",
}


def host_violations(root: Path) -> list[str]:
    """Every import of ComfyUI and every use of a ComfyUI internal outside HOST_ADAPTERS, and every import of one
    node module by another that NODE_TO_NODE does not list."""
    modules, graph = import_graph(root)
    problems = []
    for module, path in modules.items():
        where = path.relative_to(root)
        if module not in HOST_ADAPTERS:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for name in names:
                    if name.split(".")[0] in COMFY_PACKAGES:
                        problems.append(f"{where}:{node.lineno}: imports {name}; reach ComfyUI through nodes/host.py")
                if isinstance(node, ast.Attribute) and node.attr in HOST_INTERNALS:
                    problems.append(f"{where}:{node.lineno}: touches ComfyUI's .{node.attr}; do it in nodes/host.py")
        if layer_of(module) != "nodes":
            continue
        for target, line, *_ in graph[module]:
            pair = (module, target)
            if (layer_of(target) == "nodes" and target not in ("stylora.nodes.host", module)
                    and pair not in NODE_TO_NODE and (module, "*") not in NODE_TO_NODE):
                problems.append(f"{where}:{line}: node module {module} imports {target}; share it through "
                                "nodes/host.py")
    return problems


def test_only_the_host_adapter_reaches_comfyuis_internals():
    problems = host_violations(REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("file, line, expected", [
    ("nodes/content.py", "def f():\n    import comfy.sd\n", "imports comfy.sd; reach ComfyUI through nodes/host.py"),
    ("nodes/style_lora.py", "import folder_paths\n", "imports folder_paths"),
    ("eval/weights.py", "from folder_paths import get_folder_paths\n", "imports folder_paths"),
    ("nodes/strength.py", "def f(m):\n    m.patches = {}\n", "touches ComfyUI's .patches"),
    ("nodes/style_lora.py", "def f(m):\n    return m.model.model_config\n", "touches ComfyUI's .model_config"),
    ("nodes/metrics.py", "def f(m):\n    m.patches_uuid = 1\n", "touches ComfyUI's .patches_uuid"),
    ("nodes/content.py", "def f(m):\n    return m.model_options\n", "touches ComfyUI's .model_options"),
    ("nodes/mask.py", "from .strength import StyleStrength\n", "node module stylora.nodes.mask imports "
                                                               "stylora.nodes.strength"),
])
def test_comfyui_outside_the_host_is_caught(tmp_path, file, line, expected):
    root = _copy_pack(tmp_path)
    assert not host_violations(root)
    path = root / file
    path.write_text(path.read_text(encoding="utf-8") + "\n" + line, encoding="utf-8")
    assert any(expected in p for p in host_violations(root)), host_violations(root)
