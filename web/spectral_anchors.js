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
// - Invalid values (INPUT_RANGES: the Python schemas' ranges, plus VALUE_RULES: what the nodes refuse at queue
//   or run time) show as warnings on the node that holds them, before queueing.
//
// Both of the frontend's renderers show the hints. The classic LiteGraph canvas calls node.badges entries
// every frame and draws what they return; the Vue renderer ("Nodes 2.0", Comfy.VueNodes.Enabled) never runs
// onDrawForeground and renders each badge entry's result from its OWN enumerable properties (text, fgColor,
// bgColor) as a DOM pill, re-rendering only when reactive state it read changes. So each node keeps a fixed
// number of badge slots: objects with own text/fgColor/bgColor that are Vue-reactive where the app lets us
// make them so, refreshed on graph changes; in classic mode the first entry draws every hint itself.
//
// Written defensively: node types the pack does not define (yet) are simply not decorated, missing widgets or
// links give no hint, and a failure here never breaks drawing. Text from workflows is only ever drawn on the
// canvas with fillText or handed to the frontend's badge component as plain text (no HTML anywhere).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

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

// ---------------------------------------------------------------- invalid values, flagged before queueing

// The ranges the Python schemas declare (nodes/*.py: min / max of each io.Int / io.Float input). A loaded
// workflow can hold anything, whatever the widgets allow; tests compare this table with /object_info. Inputs a
// node does not have (e.g. SpectralStoryPrompts' anchors before it gains one) are skipped.
export const INPUT_RANGES = {
  SpectralAnchorAttention: {
    anchors: { min: 1, max: 64, integer: true },
    start_percent: { min: 0, max: 1 },
    end_percent: { min: 0, max: 1 },
    mask_dropout: { min: 0, max: 1 },
  },
  SpectralTruncate: { value: { min: 0, max: 4096 } },
  SpectralReweight: { alpha: { min: -10, max: 10 } },
  SpectralFeatureInjection: {
    strength: { min: 0, max: 1 },
    start_percent: { min: 0, max: 1 },
    end_percent: { min: 0, max: 1 },
    anchors: { min: 1, max: 64, integer: true },
    feature_timestep: { min: 0, max: 999 },
  },
  SpectralStoryPrompts: {
    width: { min: 64, max: 16384, integer: true },
    height: { min: 64, max: 16384, integer: true },
    anchors: { min: 1, max: 64, integer: true },
    images_per_batch: { min: 0, max: 64, integer: true },
  },
};

const MAX_SCENES = 64; // nodes/story.py: MAX_SCENES in one batch, MAX_STORY_SCENES in a story split into runs
const MAX_STORY_SCENES = 512;
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);

function storyOf(node) {
  const story = skipReroutes(inputNode(node, "story"));
  return story?.type === "SpectralStoryPrompts" ? story : null;
}

// What each node refuses at queue or run time (attention/spectrum.py validate_truncate / validate_reweight,
// nodes/story.py, the attention node's story checks), as one warning each. Rules whose widgets are missing say
// nothing, so a node that lacks an input (an older or newer schema) shows nothing wrong.
export const VALUE_RULES = {
  SpectralTruncate: [
    (node) => {
      const mode = widgetValue(node, "mode");
      const value = widgetValue(node, "value");
      if (!isNumber(value)) return null;
      if (mode === "fixed" && (!Number.isInteger(value) || value < 1)) {
        return `fixed keeps a whole number ≥ 1, not ${formatNumber(value)}`;
      }
      if ((mode === "quantile" || mode === "energy") && !(value > 0 && value <= 1)) {
        return `${mode} needs 0 < value ≤ 1, not ${formatNumber(value)}`;
      }
      return null;
    },
  ],
  SpectralAnchorAttention: [
    (node) => widgetValue(node, "subject_masks") === true && !inputNode(node, "story")
      ? "subject_masks needs the story input" : null,
    (node) => {
      const story = storyOf(node);
      const own = widgetValue(node, "anchors");
      const told = story ? widgetValue(story, "anchors") : undefined;
      return isNumber(own) && isNumber(told) && own !== told ? `anchors ${own} ≠ story's anchors ${told}` : null;
    },
  ],
  SpectralStoryPrompts: [
    (node) => {
      const style = widgetValue(node, "style");
      if (typeof style !== "string") return null;
      const missing = ["{subject}", "{scene}"].filter((placeholder) => !style.includes(placeholder));
      return missing.length ? `style needs ${missing.join(" and ")}` : null;
    },
    (node) => {
      const count = sceneCount(node);
      if (count === 0) return "no scenes: write one per line";
      const perBatch = widgetValue(node, "images_per_batch");
      const most = isNumber(perBatch) && perBatch > 0 ? MAX_STORY_SCENES : MAX_SCENES;
      return count > most ? `${count} scenes: at most ${most}` : null;
    },
    (node) => {
      const perBatch = widgetValue(node, "images_per_batch");
      const anchors = widgetValue(node, "anchors");
      return isNumber(perBatch) && isNumber(anchors) && perBatch !== 0 && perBatch <= anchors
        ? `images_per_batch ${perBatch} must be 0 or > anchors ${anchors}` : null;
    },
    (node) => {
      const anchors = widgetValue(node, "anchors");
      const count = sceneCount(node);
      return isNumber(anchors) && count && anchors > count ? `anchors ${anchors} > ${count} scenes` : null;
    },
  ],
};

function rangeWarnings(node) {
  const warnings = [];
  for (const [name, range] of Object.entries(INPUT_RANGES[node.type] ?? {})) {
    const value = widgetValue(node, name);
    if (typeof value !== "number") continue;
    const low = range.min ?? -Infinity;
    const high = range.max ?? Infinity;
    if (!Number.isFinite(value) || value < low || value > high) {
      const upper = range.max === undefined ? "" : formatNumber(high);
      warnings.push(`${name} ${formatNumber(value)} outside ${formatNumber(low)}..${upper}`);
    } else if (range.integer && !Number.isInteger(value)) {
      warnings.push(`${name} must be a whole number, not ${formatNumber(value)}`);
    }
  }
  return warnings;
}

// Warnings about this node's own values: out of the schema's range, or refused by the node.
export function valueWarnings(node) {
  const warnings = rangeWarnings(node);
  for (const rule of VALUE_RULES[node.type] ?? []) {
    const message = rule(node);
    if (message) warnings.push(message);
  }
  return warnings.map((text) => ({ text, warning: true }));
}

const HINTS = {
  SpectralAnchorAttention: attentionHints,
  SpectralFeatureInjection: injectionHints,
  SpectralTruncate: spectrumHints,
  SpectralReweight: spectrumHints,
  SpectralStoryPrompts: storyHints,
};

// ---------------------------------------------------------------- rendering in both renderers

const BADGE_SLOTS = 6; // hints shown at most per node (the Vue renderer needs a fixed number of badge entries)
const BADGE_HEIGHT = 20;
const BADGE_FONT_SIZE = 12;
const BADGE_PADDING = 6;
const BADGE_GAP = 4;
const REFRESH_INTERVAL_MS = 400; // the Vue renderer's safety net for changes no event reports
const CONTROLLER = Symbol("spectralHintSlots");

function pillColors(hint) {
  return hint.warning ? WARNING_COLORS : INFO_COLORS;
}

// Classic canvas: every hint of a node side by side, drawn with fillText. text/fgColor/bgColor are own
// properties too (the first hint's colours), for any renderer that reads a badge's fields.
class HintRow {
  constructor(hints) {
    Object.defineProperty(this, "hints", { value: hints });
    this.text = hints.map((hint) => hint.text).join(" · ");
    const colors = hints.length ? pillColors(hints[0]) : INFO_COLORS;
    this.fgColor = colors.fg;
    this.bgColor = colors.bg;
  }

  get visible() {
    return this.hints.length > 0;
  }

  get height() {
    return BADGE_HEIGHT;
  }

  widths(ctx) {
    const { font } = ctx;
    ctx.font = `${BADGE_FONT_SIZE}px sans-serif`;
    const widths = this.hints.map((hint) => ctx.measureText(hint.text).width + BADGE_PADDING * 2);
    ctx.font = font;
    return widths;
  }

  getWidth(ctx) {
    const widths = this.widths(ctx);
    return widths.reduce((sum, w) => sum + w, 0) + BADGE_GAP * Math.max(0, widths.length - 1);
  }

  draw(ctx, x, y) {
    if (!this.visible) return;
    const widths = this.widths(ctx);
    const { font, fillStyle, textBaseline, textAlign } = ctx;
    ctx.font = `${BADGE_FONT_SIZE}px sans-serif`;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    this.hints.forEach((hint, index) => {
      const colors = pillColors(hint);
      ctx.fillStyle = colors.bg;
      ctx.beginPath();
      if (ctx.roundRect) ctx.roundRect(x, y, widths[index], BADGE_HEIGHT, 5);
      else ctx.rect(x, y, widths[index], BADGE_HEIGHT);
      ctx.fill();
      ctx.fillStyle = colors.fg;
      ctx.fillText(hint.text, x + BADGE_PADDING, y + BADGE_HEIGHT / 2 + 1);
      x += widths[index] + BADGE_GAP;
    });
    ctx.font = font;
    ctx.fillStyle = fillStyle;
    ctx.textBaseline = textBaseline;
    ctx.textAlign = textAlign;
  }
}

// Classic canvas: the slots after the first draw nothing (the first one draws the whole row).
const NO_BADGE = Object.freeze(new HintRow([]));

// A Vue-reactive copy of a plain object, so the Vue renderer re-renders when we change it. Extensions cannot
// import the app's Vue (newer frontends bundle it), but every reactive object hands out reactive proxies of
// what is stored in it: the workspace store (app.extensionManager, a Pinia store) lends itself for a moment.
// Where that is not available the slots stay plain objects: the Vue renderer then shows the hints as they were
// when it last rendered the node.
function makeReactive(object) {
  const store = app.extensionManager;
  if (!store || typeof store !== "object" || store.__v_raw === undefined) return object;
  const key = "__spectralAnchorsReactive";
  try {
    store[key] = object;
    const proxy = store[key];
    return proxy && proxy !== object ? proxy : object;
  } catch {
    return object;
  } finally {
    try {
      delete store[key];
    } catch {
      // a store that refuses deletion keeps one harmless key
    }
  }
}

// The Vue renderer keys its node components by node id and may keep one (and the badge objects it last read)
// when a graph is cleared and refilled with nodes of the same ids, so the reactive slots belong to (graph, id)
// rather than to a node object: whichever node holds that id now writes into the objects on screen.
const slotRegistry = new WeakMap(); // graph -> Map(node id -> slot objects)

function newSlots() {
  return Array.from({ length: BADGE_SLOTS }, () => makeReactive({ text: "", fgColor: "", bgColor: "" }));
}

function slotsOf(graph, id, create = true) {
  let byId = slotRegistry.get(graph);
  if (!byId) {
    if (!create) return null;
    byId = new Map();
    slotRegistry.set(graph, byId);
  }
  let slots = byId.get(id);
  if (!slots && create) {
    slots = newSlots();
    byId.set(id, slots);
  }
  return slots ?? null;
}

function writeSlots(slots, hints) {
  slots.forEach((slot, index) => {
    const hint = hints[index];
    const colors = hint ? pillColors(hint) : { fg: "", bg: "" };
    const text = hint ? hint.text : "";
    // Only changed fields are written: each write re-renders the node.
    if (slot.text !== text) slot.text = text;
    if (slot.fgColor !== colors.fg) slot.fgColor = colors.fg;
    if (slot.bgColor !== colors.bg) slot.bgColor = colors.bg;
  });
}

const UNPLACED = Object.freeze({ text: "", fgColor: "", bgColor: "" });

class HintSlots {
  constructor(node) {
    this.node = node;
    this.entries = Array.from({ length: BADGE_SLOTS }, (_, index) => () => {
      if (vueNodesMode()) return node.graph ? slotsOf(node.graph, node.id)[index] : UNPLACED;
      return index === 0 ? new HintRow(node.getSpectralHints()) : NO_BADGE;
    });
  }

  refresh() {
    const { node } = this;
    if (node.graph) writeSlots(slotsOf(node.graph, node.id), node.getSpectralHints().slice(0, BADGE_SLOTS));
  }
}

function vueNodesMode() {
  return Boolean(globalThis.LiteGraph?.vueNodesMode);
}

function graphsOnScreen() {
  return [...new Set([app.graph, app.canvas?.graph].filter(Boolean))];
}

function refreshAll() {
  for (const graph of graphsOnScreen()) {
    const present = new Set();
    for (const node of graph.nodes ?? graph._nodes ?? []) {
      present.add(node.id);
      try {
        node[CONTROLLER]?.refresh();
      } catch (error) {
        if (!warnedNodes.has(node)) console.warn(`[${EXTENSION_NAME}] hint refresh failed for node ${node.id}:`, error);
        warnedNodes.add(node);
      }
    }
    // Ids no pack node holds any more (removed, or now another node type) show nothing.
    for (const [id, slots] of slotRegistry.get(graph) ?? []) {
      if (!present.has(id) || !graph.getNodeById?.(id)?.[CONTROLLER]) writeSlots(slots, []);
    }
  }
}

let refreshPending = false;
// Hints depend on other nodes (the story's scenes, the sampler's latent), so any change refreshes every node.
function scheduleRefresh() {
  if (refreshPending) return;
  refreshPending = true;
  setTimeout(() => {
    refreshPending = false;
    refreshAll();
  }, 0);
}

function chain(object, name, after) {
  const original = object[name];
  object[name] = function (...args) {
    const result = original?.apply(this, args);
    after();
    return result;
  };
}

function isPackNode(nodeData) {
  return typeof nodeData?.category === "string" && nodeData.category.split("/")[0] === PACK_CATEGORY;
}

app.registerExtension({
  name: EXTENSION_NAME,

  async setup() {
    api.addEventListener("graphChanged", scheduleRefresh);
    // Edits the change tracker has not seen yet (a value typed but not committed, a link being dragged).
    setInterval(() => {
      if (vueNodesMode() && document.visibilityState === "visible") refreshAll();
    }, REFRESH_INTERVAL_MS);
    scheduleRefresh();
  },

  async afterConfigureGraph() {
    scheduleRefresh();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const hintsFor = HINTS[nodeData.name];
    // Decided here, per node type: node.type is not set yet when nodeCreated runs.
    nodeType.prototype.hasSpectralHints = Boolean(hintsFor);
    // Public for tests and other extensions: the hints the badges show right now.
    nodeType.prototype.getSpectralHints = function () {
      if (!hintsFor || !this.graph) return [];
      try {
        return [...hintsFor(this), ...valueWarnings(this)]
          .map((hint) => ({ text: clip(String(hint.text)), warning: Boolean(hint.warning) }));
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
    if (!node.hasSpectralHints || !Array.isArray(node.badges)) return;
    const slots = new HintSlots(node);
    Object.defineProperty(node, CONTROLLER, { value: slots });
    node.badges.push(...slots.entries);
    for (const hook of ["onAdded", "onConnectionsChange", "onWidgetChanged", "onConfigure"]) {
      chain(node, hook, scheduleRefresh);
    }
    for (const widget of node.widgets ?? []) chain(widget, "callback", scheduleRefresh);
  },
});
