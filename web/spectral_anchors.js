// Spectral Anchors: small on-canvas hints for the pack's nodes, so mistakes show before queueing.
//
// - Every node of the pack gets a distinct colour (only when it has none: saved colours win).
// - SpectralAnchorAttention: "anchors A of B" (B from the sampler's latent or the story node), the spectrum
//   chains that feed its keys and values, and a warning when every image is an anchor or the sharing window
//   is empty (end_percent <= start_percent turns sharing off).
// - SpectralTruncate / SpectralReweight: the chain they build, upstream first, as the SPECTRUM's repr writes it
//   (e.g. "log_squared -> energy(0.95)"); the spectrum plot titles its panels with the same text.
// - SpectralStoryPrompts: the scene count, and a warning when a connected attention node has anchors >= scenes.
// - SpectralFeatureInjection: a warning when its settings turn injection off.
//
// Written defensively: node types the pack does not define (yet) are simply not decorated, missing widgets or
// links give no hint, and a failure here never breaks drawing. Text from workflows is only ever drawn on the
// canvas with fillText (no HTML anywhere).
import { app } from "../../scripts/app.js";

const EXTENSION_NAME = "spectral_anchors.hints";
const PACK_CATEGORY = "spectral_anchors";
const NODE_COLOR = "#35305a";
const NODE_BGCOLOR = "#25223d";
const INFO_COLORS = { fg: "#e8e6ff", bg: "#4a3f8c" };
const WARNING_COLORS = { fg: "#1a1000", bg: "#f0a030" };
const MAX_HOPS = 32; // graphs are small; the bound only guards against cycles through odd custom nodes
const MAX_TEXT = 60;
const warnedNodes = new WeakSet(); // hints are recomputed every frame: report a failure once per node

function widgetValue(node, name) {
  const widget = node?.widgets?.find((w) => w.name === name);
  return widget ? widget.value : undefined;
}

function inputNode(node, name) {
  const slot = node?.findInputSlot?.(name) ?? -1;
  return slot >= 0 ? (node.getInputNode(slot) ?? null) : null;
}

function outputNodes(node, type) {
  const found = [];
  (node?.outputs ?? []).forEach((output, slot) => {
    if (output.type === type) found.push(...(node.getOutputNodes(slot) ?? []));
  });
  return found;
}

// Python's format(value, "g"), as attention/spectrum.py labels steps.
function formatNumber(value) {
  return typeof value === "number" && Number.isFinite(value) ? String(Number(value.toPrecision(6))) : "?";
}

function clip(text) {
  return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT - 1)}…` : text;
}

// Legacy Reroute nodes pass a link through unchanged.
function skipReroutes(node) {
  for (let hops = 0; node && node.type === "Reroute" && hops < MAX_HOPS; hops++) node = node.getInputNode(0);
  return node;
}

// One step's label, as attention/spectrum.py's Truncate.label / Reweight.label write it.
function stepLabel(node) {
  const mode = widgetValue(node, "mode") ?? "?";
  if (node.type === "SpectralTruncate") {
    const value = widgetValue(node, "value");
    if (mode === "fixed" && typeof value === "number") return `fixed(${Math.trunc(value)})`;
    return `${mode}(${formatNumber(value)})`;
  }
  return mode === "exp" ? `exp(${formatNumber(widgetValue(node, "alpha"))})` : String(mode);
}

// The filter chain ending at `node`, written like the SPECTRUM's repr: upstream (applied first) first, e.g.
// "log_squared -> energy(0.95)", with " [lowrank]" when the solver in force is not exact. Null when no spectrum
// node is there.
export function spectrumChain(node) {
  const labels = [];
  const seen = new Set();
  let solver = null; // the most downstream Truncate's solver applies to the whole chain
  let current = skipReroutes(node);
  while (current && !seen.has(current) && labels.length < MAX_HOPS) {
    seen.add(current);
    if (current.type !== "SpectralTruncate" && current.type !== "SpectralReweight") {
      labels.push("?"); // some other node makes this SPECTRUM: say so rather than guess
      break;
    }
    labels.push(stepLabel(current));
    if (solver === null && current.type === "SpectralTruncate") solver = widgetValue(current, "solver") ?? null;
    current = skipReroutes(inputNode(current, "spectrum"));
  }
  if (!labels.length) return null;
  const text = labels.reverse().join(" -> ");
  return solver && solver !== "exact" ? `${text} [${solver}]` : text;
}

// Non-blank lines, as SpectralStoryPrompts counts them.
export function sceneCount(node) {
  const scenes = widgetValue(node, "scenes");
  return typeof scenes === "string" ? scenes.split(/\r?\n/).filter((line) => line.trim()).length : null;
}

// Images per batch that a latent source makes, or null when it cannot be told from the canvas.
function latentBatch(node) {
  node = skipReroutes(node);
  if (!node) return null;
  if (node.type === "SpectralStoryPrompts") return sceneCount(node);
  const size = widgetValue(node, "batch_size");
  return typeof size === "number" ? size : null;
}

// Samplers fed (directly or through model patch nodes) by this node's MODEL output.
function samplersDownstream(node) {
  const samplers = new Set();
  const seen = new Set([node]);
  let frontier = [node];
  for (let hops = 0; frontier.length && hops < MAX_HOPS; hops++) {
    const next = [];
    for (const current of frontier) {
      for (const target of outputNodes(current, "MODEL")) {
        if (seen.has(target)) continue;
        seen.add(target);
        if (target.findInputSlot?.("latent_image") >= 0) samplers.add(target);
        else next.push(target);
      }
    }
    frontier = next;
  }
  return [...samplers];
}

// The attention node found walking up a sampler's (or patch node's) model input, if any.
function attentionUpstream(node) {
  const seen = new Set();
  let current = skipReroutes(inputNode(node, "model"));
  while (current && !seen.has(current) && seen.size < MAX_HOPS) {
    if (current.type === "SpectralAnchorAttention") return current;
    seen.add(current);
    current = skipReroutes(inputNode(current, "model"));
  }
  return null;
}

function singleValue(values) {
  const distinct = [...new Set(values.filter((v) => typeof v === "number"))];
  return distinct.length === 1 ? distinct[0] : null;
}

// How many images the attention node's batch holds: from its story, else from its samplers' latents.
export function attentionBatch(node) {
  const story = skipReroutes(inputNode(node, "story"));
  if (story?.type === "SpectralStoryPrompts") return sceneCount(story);
  return singleValue(samplersDownstream(node).map((sampler) => latentBatch(inputNode(sampler, "latent_image"))));
}

function attentionHints(node) {
  const anchors = widgetValue(node, "anchors");
  const batch = attentionBatch(node);
  const hints = [{ text: typeof batch === "number" ? `anchors ${anchors} of ${batch}` : `anchors ${anchors}`,
                   warning: false }];
  const keyChain = spectrumChain(inputNode(node, "key_spectrum"));
  const valueChain = spectrumChain(inputNode(node, "value_spectrum"));
  if (keyChain) hints.push({ text: `K: ${keyChain}`, warning: false });
  if (valueChain) hints.push({ text: `V: ${valueChain}`, warning: false });
  const start = widgetValue(node, "start_percent");
  const end = widgetValue(node, "end_percent");
  if (typeof start === "number" && typeof end === "number" && end <= start) {
    hints.push({ text: "sharing off: end ≤ start", warning: true });
  }
  if (typeof batch === "number" && typeof anchors === "number" && anchors >= batch) {
    hints.push({ text: `all ${batch} images are anchors`, warning: true });
  }
  return hints;
}

function spectrumHints(node) {
  const chain = spectrumChain(node);
  return chain ? [{ text: chain, warning: false }] : [];
}

function storyHints(node) {
  const count = sceneCount(node);
  if (count === null) return [];
  const hints = [{ text: `${count} ${count === 1 ? "scene" : "scenes"}`, warning: false }];
  const attention = new Set(outputNodes(node, "SPECTRAL_STORY").map(skipReroutes)
    .filter((target) => target?.type === "SpectralAnchorAttention"));
  for (const type of ["CONDITIONING", "LATENT"]) {
    for (const sampler of outputNodes(node, type)) {
      const found = attentionUpstream(sampler);
      if (found) attention.add(found);
    }
  }
  const anchors = [...attention].map((n) => widgetValue(n, "anchors")).filter((a) => typeof a === "number");
  const most = anchors.length ? Math.max(...anchors) : null;
  if (most !== null && most >= count) {
    hints.push({ text: `anchors ${most} ≥ ${count} scenes: no image follows them`, warning: true });
  }
  return hints;
}

function injectionHints(node) {
  const strength = widgetValue(node, "strength");
  const start = widgetValue(node, "start_percent");
  const end = widgetValue(node, "end_percent");
  if (strength === 0) return [{ text: "injection off: strength 0", warning: true }];
  if (typeof start === "number" && typeof end === "number" && end <= start) {
    return [{ text: "injection off: end ≤ start", warning: true }];
  }
  return [];
}

const HINTS = {
  SpectralAnchorAttention: attentionHints,
  SpectralFeatureInjection: injectionHints,
  SpectralTruncate: spectrumHints,
  SpectralReweight: spectrumHints,
  SpectralStoryPrompts: storyHints,
};

// A node badge (drawn above the title bar by LiteGraph) showing this node's hints side by side.
class HintBadge {
  constructor(hints) {
    this.hints = hints;
    this.height = 20;
    this.fontSize = 12;
    this.padding = 6;
    this.gap = 4;
  }

  get visible() {
    return this.hints.length > 0;
  }

  // Plain text of the badge, for renderers that read badge.text instead of calling draw().
  get text() {
    return this.hints.map((hint) => hint.text).join(" · ");
  }

  widths(ctx) {
    const { font } = ctx;
    ctx.font = `${this.fontSize}px sans-serif`;
    const widths = this.hints.map((hint) => ctx.measureText(hint.text).width + this.padding * 2);
    ctx.font = font;
    return widths;
  }

  getWidth(ctx) {
    const widths = this.widths(ctx);
    return widths.reduce((sum, w) => sum + w, 0) + this.gap * Math.max(0, widths.length - 1);
  }

  draw(ctx, x, y) {
    if (!this.visible) return;
    const widths = this.widths(ctx);
    const { font, fillStyle, textBaseline, textAlign } = ctx;
    ctx.font = `${this.fontSize}px sans-serif`;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    this.hints.forEach((hint, index) => {
      const colors = hint.warning ? WARNING_COLORS : INFO_COLORS;
      ctx.fillStyle = colors.bg;
      ctx.beginPath();
      if (ctx.roundRect) ctx.roundRect(x, y, widths[index], this.height, 5);
      else ctx.rect(x, y, widths[index], this.height);
      ctx.fill();
      ctx.fillStyle = colors.fg;
      ctx.fillText(hint.text, x + this.padding, y + this.height / 2 + 1);
      x += widths[index] + this.gap;
    });
    ctx.font = font;
    ctx.fillStyle = fillStyle;
    ctx.textBaseline = textBaseline;
    ctx.textAlign = textAlign;
  }
}

function isPackNode(nodeData) {
  return typeof nodeData?.category === "string" && nodeData.category.split("/")[0] === PACK_CATEGORY;
}

app.registerExtension({
  name: EXTENSION_NAME,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const hintsFor = HINTS[nodeData.name];
    // Decided here, per node type: node.type is not set yet when nodeCreated runs.
    nodeType.prototype.hasSpectralHints = Boolean(hintsFor);
    // Public for tests and other extensions: the hints the badge shows right now.
    nodeType.prototype.getSpectralHints = function () {
      if (!hintsFor || !this.graph) return [];
      try {
        return hintsFor(this).map((hint) => ({ text: clip(String(hint.text)), warning: hint.warning }));
      } catch (error) {
        if (!warnedNodes.has(this)) console.warn(`[${EXTENSION_NAME}] no hints for node ${this.id}:`, error);
        warnedNodes.add(this);
        return [];
      }
    };
  },

  nodeCreated(node) {
    if (typeof node.getSpectralHints !== "function") return;
    if (node.color === undefined && node.bgcolor === undefined) {
      node.color = NODE_COLOR;
      node.bgcolor = NODE_BGCOLOR;
    }
    if (node.hasSpectralHints && Array.isArray(node.badges)) {
      node.badges.push(() => new HintBadge(node.getSpectralHints()));
    }
  },
});
