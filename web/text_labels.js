// Spectral Anchors: visible labels on Spectral Story Prompts' multiline text boxes (scenes, style, negative).
//
// Both renderers show a multiline STRING input as a bare text box: the classic canvas as a <textarea> DOM
// widget, the Vue renderer ("Nodes 2.0") of comfyui-frontend-package 1.32.x as a <textarea> with the input's
// name only as placeholder and aria-label. A placeholder (the Python schema's `placeholder=`) shows only while
// the box is empty, and these boxes have defaults, so nothing tells the three apart. Newer Vue renderers draw a
// <label> above the box themselves; there this adds nothing.
//
// How: the text box is marked with data-spectral-label (classic: on the DOM widget's element; Vue: through the
// widget's options, which the Vue text box passes on to the <textarea> as attributes), and one static style
// sheet draws the label as generated content on the box's container, above its first line. The label texts are
// this file's constants (never workflow text), written with textContent.
import { app } from "../../scripts/app.js";

const EXTENSION_NAME = "spectral_anchors.text_labels";
const LABEL_ATTRIBUTE = "data-spectral-label";
// Input name -> the label shown on its text box, per node type.
export const TEXT_BOX_LABELS = {
  SpectralStoryPrompts: { scenes: "scenes", style: "style", negative: "negative" },
};
const STYLE_ID = "spectral-anchors-text-labels";

function cssString(text) {
  return `"${String(text).replace(/["\\\n]/g, " ")}"`;
}

function styleSheetText() {
  const names = new Map();
  for (const labels of Object.values(TEXT_BOX_LABELS)) {
    for (const [name, label] of Object.entries(labels)) names.set(name, label);
  }
  // The container is the classic DOM widget's absolutely placed box, or the Vue text box's relative wrapper;
  // `:not(:has(> label))` leaves renderers that label the box themselves alone.
  const container = `:has(> textarea[${LABEL_ATTRIBUTE}]):not(:has(> label))`;
  const rules = [
    `${container}::before { position: absolute; top: 3px; left: 8px; z-index: 2; pointer-events: none;`
      + " font: 600 10px/12px sans-serif; letter-spacing: 0.02em; color: var(--descrip-text, #a9a9b8);"
      + " opacity: 0.9; }",
    `${container} > textarea[${LABEL_ATTRIBUTE}] { padding-top: 16px !important; }`,
  ];
  for (const [name, label] of names) {
    rules.push(`:has(> textarea[${LABEL_ATTRIBUTE}=${cssString(name)}]):not(:has(> label))::before`
      + ` { content: ${cssString(label)}; }`);
  }
  return rules.join("\n");
}

function installStyleSheet() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = styleSheetText();
  document.head.appendChild(style);
}

// Mark the node's multiline text boxes; called when the node is created, before either renderer shows it.
export function labelTextBoxes(node, labels) {
  for (const widget of node.widgets ?? []) {
    if (!(widget.name in labels)) continue;
    if (widget.element instanceof HTMLTextAreaElement) widget.element.setAttribute(LABEL_ATTRIBUTE, widget.name);
    if (widget.options && typeof widget.options === "object") widget.options[LABEL_ATTRIBUTE] = widget.name;
  }
}

app.registerExtension({
  name: EXTENSION_NAME,

  async setup() {
    installStyleSheet();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const labels = TEXT_BOX_LABELS[nodeData?.name];
    if (!labels) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = created?.apply(this, args);
      try {
        labelTextBoxes(this, labels);
      } catch (error) {
        console.warn(`[${EXTENSION_NAME}] could not label node ${this.id}:`, error);
      }
      return result;
    };
  },
});
