// Shows StyleMetrics' numbers on the node itself (ComfyUI's frontend draws returned text only for Preview Any).
// The text box is the frontend's own multiline STRING widget, set through `widget.value`, as core Preview Any
// does: every renderer draws that widget from its value (frontend 1.27's canvas, and 1.5x's canvas and Vue
// "Nodes 2.0" renderer, which replaces a pack's own DOM element by its textarea bound to the value).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "metrics";
const LINE_PX = 16; // one line of the textarea's text (frontend font ~12-13 px with its line height)
const MIN_WIDTH = 420;

app.registerExtension({
  name: "stylora.StyleMetrics",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "StyleMetrics") return;
    // 1. The box is made with the node (as Preview Any does), so every renderer lays it out from the start.
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
      widget.label = "Metrics";
      widget.serialize = false; // output, not a setting: never saved into the workflow
      if (widget.options) widget.options.serialize = false;
      if (widget.element) widget.element.readOnly = true;
    };
    // 2. A run's text goes in through the widget's value; the node grows so all its lines show without scrolling:
    // first by an estimate (one line per text line), then, once the renderer has drawn the box, by what still
    // overflows it (long lines wrap, and each renderer has its own font and padding).
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      const widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) return;
      widget.value = text;
      const lines = text.split("\n").length;
      const fixed = this.computeSize()[1]; // title, slots and the other widgets (with the box's minimum height)
      this.setSize([Math.max(this.size[0], MIN_WIDTH), Math.max(this.size[1], fixed + lines * LINE_PX)]);
      app.graph.setDirtyCanvas(true, true);
      requestAnimationFrame(() => requestAnimationFrame(() => growToFit(this, widget)));
    };
  },
});

// The text box as drawn: the Vue renderer's own textarea inside the node's element, or the canvas renderer's DOM
// widget element. Heights are in the node's own units (both renderers scale the node with a CSS transform).
function growToFit(node, widget) {
  const vue = document.querySelector(`[data-node-id="${node.id}"] textarea`);
  const box = [vue, widget.element].find((e) => e instanceof HTMLTextAreaElement && e.isConnected && e.clientHeight);
  if (!box) return;
  const overflow = box.scrollHeight - box.clientHeight;
  if (overflow > 0) {
    node.setSize([node.size[0], node.size[1] + overflow + 4]);
    app.graph.setDirtyCanvas(true, true);
  }
}
