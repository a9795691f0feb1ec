// Spectral Anchors: the consistency score's report, shown in the node after it runs.
//
// SpectralConsistencyScore returns its report as the node's UI output ({"text": [report]}); this extension gives
// the node a read-only multiline text box and puts the report in it when the node executes. A multiline STRING
// widget is a text area in both renderers (the classic LiteGraph canvas and the Vue "Nodes 2.0" nodes), and the
// report is only ever assigned as a text value: nothing is parsed as HTML.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION_NAME = "spectral_anchors.score_report";
const NODE_TYPE = "SpectralConsistencyScore";
const WIDGET_NAME = "score_report";
const PLACEHOLDER = "Queue the workflow: the report of the last run appears here.";

function reportWidget(node) {
  return node.widgets?.find((widget) => widget.name === WIDGET_NAME);
}

function addReportWidget(node) {
  if (reportWidget(node)) return;
  const widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
  widget.serialize = false; // the report is output, not a setting: never saved in the workflow or the prompt
  widget.options = { ...(widget.options ?? {}), read_only: true, serialize: false };
  if (widget.element) {
    widget.element.readOnly = true;
    widget.element.placeholder = PLACEHOLDER;
    widget.element.spellcheck = false;
    widget.element.style.fontFamily = "monospace";
  }
  widget.value = "";
  // Room for a report of a few images without resizing; a saved workflow's own size is applied after this.
  node.setSize?.([Math.max(node.size?.[0] ?? 0, 440), Math.max(node.size?.[1] ?? 0, 340)]);
}

function reportText(message) {
  const text = message?.text;
  if (Array.isArray(text)) return text.map((part) => String(part)).join("\n");
  return typeof text === "string" ? text : "";
}

app.registerExtension({
  name: EXTENSION_NAME,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        addReportWidget(this);
      } catch (error) {
        console.warn(`[${EXTENSION_NAME}] could not add the report box`, error);
      }
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const widget = reportWidget(this);
      if (widget) {
        widget.value = reportText(message);
        this.setDirtyCanvas?.(true, true);
      }
      return result;
    };
  },
});
