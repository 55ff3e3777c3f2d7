"""The contract between the bundled workflows and `stylora run`: the node titles (`_meta.title`) the builder
writes and the client looks up, each with the part it plays. A custom API-format workflow works with
`stylora run` when it titles its nodes the same way; a role the run needs and the workflow lacks is a
WorkflowError that names the title and the role.
"""

from __future__ import annotations

from dataclasses import dataclass


class WorkflowError(ValueError):
    """A workflow does not fit `stylora run`: a node role it needs is missing or of the wrong kind."""


@dataclass(frozen=True)
class Role:
    title: str  # the node's title in the workflow (`_meta.title` in API format)
    purpose: str  # what the node does for `stylora run`, for error messages


CHECKPOINT = Role("Checkpoint", "the base checkpoint loader that --checkpoint names")
STYLE = Role("Style", "the Load Style LoRA node that --style fills")
STYLE_CHECKPOINT = Role("Style checkpoint", "the checkpoint loader that --style names in the DreamBooth workflow")
STRENGTH = Role("Strength", "the Style Strength node that --strength sets")
CONTENT = Role("Content", "the LoadImage node that takes the --content photo")
SAMPLER = Role("Sampler", "the sampler whose seed/denoise --seed/--strength set")
STYLE_IMAGE = Role("Style image", "the LoadImage node that takes --style-image")
COLOURS = Role("Keep colours", "the Keep Photo Colours node whose amount --keep-colours sets")
CONTROLNET = Role("ControlNet", "the ControlNetLoader whose file --controlnet names (layout_guard)")
TRAIN = Role("Train style", "the Train Style LoRA node, which trains on the checkpoint --checkpoint names")
ROLES = (CHECKPOINT, STYLE, STYLE_CHECKPOINT, STRENGTH, CONTENT, SAMPLER, STYLE_IMAGE, COLOURS, CONTROLNET, TRAIN)


def node_titled(graph: dict[str, dict], title: str) -> dict | None:
    """The first node of an API-format graph whose `_meta.title` is `title`, or None."""
    return next((n for n in graph.values() if n.get("_meta", {}).get("title") == title), None)


def find(graph: dict[str, dict], role: Role) -> dict | None:
    """The node that plays `role`, or None when the workflow has none (an optional role)."""
    return node_titled(graph, role.title)


def require(graph: dict[str, dict], role: Role, workflow: str) -> dict:
    """The node that plays `role`; a WorkflowError naming the title and the role when there is none."""
    node = find(graph, role)
    if node is None:
        raise WorkflowError(f"workflow {workflow!r} has no node titled {role.title!r} (role: {role.purpose})")
    return node
