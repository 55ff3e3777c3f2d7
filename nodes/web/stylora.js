// Shows StyleMetrics' numbers on the node itself (ComfyUI's frontend draws returned text only for Preview Any).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "stylora.StyleMetrics",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "StyleMetrics") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "stylora_metrics_text");
      if (!widget) {
        const area = document.createElement("textarea");
        area.readOnly = true;
        area.style.fontFamily = "monospace";
        area.style.fontSize = "11px";
        widget = this.addDOMWidget("stylora_metrics_text", "customtext", area, {
          getValue: () => area.value,
          setValue: (v) => { area.value = v; },
          serialize: false,
        });
        widget.serialize = false;
      }
      widget.element.value = text;
      this.setSize([Math.max(this.size[0], 420), Math.max(this.size[1], 260)]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
