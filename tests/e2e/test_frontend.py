"""The real frontend (comfyui-frontend-package, as pinned) in headless Chromium, against the real server.

Every example workflow loads with no missing node and no error and converts to a prompt that /prompt accepts;
the pack's node types are registered; the pack's extension is loaded and draws the hints it promises. The hints,
the warnings about invalid values and the Story node's text box labels are checked as rendered in both of the
frontend's renderers (classic canvas and Vue "Nodes 2.0"), with the pinned frontend and the newest one on PyPI.
Screenshots go to artifacts/ (git-ignored).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from e2e_support import (
    BUILD_GRAPH_JS,
    DRAWN_TEXT_JS,
    KNOWN_CONSOLE_ERRORS,
    LOAD_WORKFLOW_JS,
    RENDERED_HINTS_JS,
    WORKFLOW_DIR,
    AppPage,
    RenderedPage,
    css_color,
    graph_to_prompt,
    pack_node_ids,
    workflow_paths,
)
from workflow_graphs import WORKFLOWS

NODE_IDS = pack_node_ids()
EXTENSION_NAME = "spectral_anchors.hints"
BASIC_WORKFLOW = WORKFLOW_DIR / f"{WORKFLOWS['anchor_attention_basic'].title}.json"
QUEUE_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def page(app_page: AppPage) -> AppPage:
    app_page.take_errors()  # a fresh user's start-up 404s (user.css, empty userdata folders) are the app's own
    return app_page


def registered(page: AppPage, node_type: str) -> bool:
    return page.evaluate("(type) => type in LiteGraph.registered_node_types", node_type)


def hints(page: AppPage, node_id: int) -> list[dict]:
    return page.evaluate("(id) => app.graph.getNodeById(id).getSpectralHints()", node_id)


def set_widget(page: AppPage, node_id: int, name: str, value: object) -> None:
    page.evaluate("([id, name, value]) => { app.graph.getNodeById(id).widgets.find((w) => w.name === name).value"
                  " = value; }", [node_id, name, value])


def build(page: AppPage, nodes: list, links: list) -> dict[str, int]:
    return page.evaluate(BUILD_GRAPH_JS, {"nodes": nodes, "links": links, "scale": 1.0, "offset": [20, 90]})


def test_pack_node_types_are_registered(page: AppPage) -> None:
    found = page.evaluate("(ids) => ids.filter((id) => id in LiteGraph.registered_node_types)", NODE_IDS)
    assert found == NODE_IDS
    categories = page.evaluate(
        "(ids) => ids.map((id) => LiteGraph.registered_node_types[id].category)", NODE_IDS)
    assert set(categories) == {"spectral_anchors"}


def test_pack_extension_is_loaded(page: AppPage) -> None:
    names = page.evaluate("() => app.extensions.map((extension) => extension.name)")
    assert EXTENSION_NAME in names
    decorated = page.evaluate(
        "(ids) => ids.filter((id) => typeof LiteGraph.registered_node_types[id].prototype.getSpectralHints"
        " === 'function')", NODE_IDS)
    assert decorated == NODE_IDS
    untouched = page.evaluate("() => typeof LiteGraph.registered_node_types.KSampler.prototype.getSpectralHints")
    assert untouched == "undefined", "the extension must leave other packs' nodes alone"


@pytest.mark.parametrize("workflow_path", workflow_paths(), ids=lambda path: path.stem)
def test_workflow_loads_and_its_prompt_is_accepted(page: AppPage, workflow_path: Path) -> None:
    workflow = json.loads(workflow_path.read_text())
    page.take_errors()
    loaded = page.evaluate(LOAD_WORKFLOW_JS, workflow)
    page.page.wait_for_timeout(300)  # let the canvas draw once for the screenshot
    page.screenshot(f"workflow-{workflow_path.stem}")
    assert loaded["count"] == len(workflow["nodes"])
    missing = [node for node in loaded["nodes"] if not node["registered"]]
    assert not missing, f"missing node types: {missing}"
    broken = [node for node in loaded["nodes"] if node["has_errors"]]
    assert not broken, f"nodes with errors after loading: {broken}"
    # The frontend reports schema-validation failures and repaired links as toasts, not console errors.
    assert not loaded["toasts"], f"the frontend complained while loading: {loaded['toasts']}"
    used = {node["type"] for node in workflow["nodes"]}
    assert used & set(NODE_IDS), "an example workflow of this pack uses at least one of its nodes"

    prompt = graph_to_prompt(page)
    output = prompt["output"]
    assert output, "graphToPrompt produced an empty prompt"
    active = {str(node["id"]): node["type"] for node in workflow["nodes"]
              if node.get("mode", 0) == 0 and node["type"] in NODE_IDS}
    assert {node_id: output[node_id]["class_type"] for node_id in active if node_id in output} == active
    assert not page.take_errors(), "loading or converting the workflow logged errors"

    # /prompt validates the whole prompt (types, combos, links, each node's validate_inputs) before queueing.
    # Model files are empty placeholders in the test server's base: validation only checks the names, and the
    # queued run then stops at the loader instead of loading weights. Waiting for it keeps the queue empty.
    status, answer = page.server.queue(output, prompt["workflow"])
    assert status == 200, f"/prompt rejected the prompt: {json.dumps(answer, indent=1)[:4000]}"
    assert answer.get("node_errors") == {}
    page.server.wait_for_history(answer["prompt_id"], QUEUE_TIMEOUT)


def test_attention_badge_counts_anchors_of_the_batch_and_warns(page: AppPage) -> None:
    workflow = json.loads(BASIC_WORKFLOW.read_text())
    page.evaluate(LOAD_WORKFLOW_JS, workflow)
    attention = next(node["id"] for node in workflow["nodes"] if node["type"] == "SpectralAnchorAttention")
    latent = next(node["id"] for node in workflow["nodes"] if node["type"] == "EmptyLatentImage")
    assert hints(page, attention) == [{"text": "anchors 2 of 4", "warning": False}]
    assert "anchors 2 of 4" in page.evaluate(DRAWN_TEXT_JS), "the hint is computed but not drawn on the canvas"

    set_widget(page, latent, "batch_size", 2)
    set_widget(page, attention, "end_percent", 0.01)
    shown = hints(page, attention)
    assert {"text": "anchors 2 of 2", "warning": False} in shown
    assert {"text": "all 2 images are anchors", "warning": True} in shown
    assert {"text": "sharing off: end ≤ start", "warning": True} in shown
    drawn = page.evaluate(DRAWN_TEXT_JS)
    assert "all 2 images are anchors" in drawn and "sharing off: end ≤ start" in drawn
    page.screenshot("extension-attention-warnings")



def test_pack_nodes_get_a_colour_unless_the_workflow_saved_one(page: AppPage) -> None:
    fresh = page.evaluate("() => [LiteGraph.createNode('SpectralAnchorAttention'), LiteGraph.createNode('KSampler')]"
                          ".map((node) => [node.color ?? null, node.bgcolor ?? null])")
    assert all(fresh[0]) and fresh[1] == [None, None]
    workflow = json.loads(BASIC_WORKFLOW.read_text())
    attention = next(node for node in workflow["nodes"] if node["type"] == "SpectralAnchorAttention")
    attention.update(color="#123456", bgcolor="#654321")
    page.evaluate(LOAD_WORKFLOW_JS, workflow)
    loaded = page.evaluate("(id) => { const n = app.graph.getNodeById(id); return [n.color, n.bgcolor]; }",
                           attention["id"])
    assert loaded == ["#123456", "#654321"]
    attention.pop("color")
    attention.pop("bgcolor")
    page.evaluate(LOAD_WORKFLOW_JS, workflow)
    loaded = page.evaluate("(id) => { const n = app.graph.getNodeById(id); return [n.color, n.bgcolor]; }",
                           attention["id"])
    assert loaded == fresh[0]


def test_spectrum_nodes_show_their_chain(page: AppPage) -> None:
    for node_type in ("SpectralTruncate", "SpectralReweight"):
        if not registered(page, node_type):
            pytest.skip(f"{node_type} is not in the pack yet")
    ids = build(page, [
        ["reweight", "SpectralReweight", [40, 60], None, {"mode": "log_squared", "alpha": 1.0}],
        ["truncate", "SpectralTruncate", [40, 260], None, {"mode": "energy", "value": 0.95}],
        ["keys", "SpectralTruncate", [40, 460], None, {"mode": "fixed", "value": 8.0, "solver": "lowrank"}],
        ["exp", "SpectralReweight", [40, 660], None, {"mode": "exp", "alpha": 0.5}],
        ["attention", "SpectralAnchorAttention", [460, 200], None, {"anchors": 2}],
    ], [
        ["reweight", "SPECTRUM", "truncate", "spectrum"],
        ["truncate", "SPECTRUM", "attention", "value_spectrum"],
        ["keys", "SPECTRUM", "attention", "key_spectrum"],
    ])
    assert hints(page, ids["reweight"]) == [{"text": "log_squared", "warning": False}]
    assert hints(page, ids["truncate"]) == [{"text": "log_squared -> energy(0.95)", "warning": False}]
    assert hints(page, ids["keys"]) == [{"text": "fixed(8) [lowrank]", "warning": False}]
    assert hints(page, ids["exp"]) == [{"text": "exp(0.5)", "warning": False}]
    assert hints(page, ids["attention"]) == [
        {"text": "anchors 2", "warning": False},  # no sampler, so the batch is unknown
        {"text": "K: fixed(8) [lowrank]", "warning": False},
        {"text": "V: log_squared -> energy(0.95)", "warning": False},
    ]
    assert "V: log_squared -> energy(0.95)" in page.evaluate(DRAWN_TEXT_JS)
    page.screenshot("extension-spectrum-chain")


def test_story_prompts_counts_scenes_and_warns_about_anchors(page: AppPage) -> None:
    if not registered(page, "SpectralStoryPrompts"):
        pytest.skip("SpectralStoryPrompts is not in the pack yet")
    # Markup in a workflow string must stay text: the node counts lines, and nothing is parsed as HTML.
    scenes = "walking in the rain\n\n<img src=x onerror=\"window.__spectralInjected=1\">\nreading a book\n"
    ids = build(page, [
        ["story", "SpectralStoryPrompts", [40, 60], [420, 520], {"scenes": scenes}],
        ["attention", "SpectralAnchorAttention", [520, 60], None, {"anchors": 2}],
        ["sampler", "KSampler", [900, 60], None, {}],
    ], [
        ["story", "CONDITIONING", "sampler", "positive"],
        ["story", "LATENT", "sampler", "latent_image"],
        ["attention", "MODEL", "sampler", "model"],
    ])
    assert hints(page, ids["story"]) == [{"text": "3 scenes", "warning": False}]
    assert hints(page, ids["attention"]) == [{"text": "anchors 2 of 3", "warning": False}]

    set_widget(page, ids["attention"], "anchors", 3)
    assert hints(page, ids["story"]) == [
        {"text": "3 scenes", "warning": False},
        {"text": "anchors 3 ≥ 3 scenes: no image follows them", "warning": True},
    ]
    assert {"text": "all 3 images are anchors", "warning": True} in hints(page, ids["attention"])
    drawn = page.evaluate(DRAWN_TEXT_JS)
    assert "3 scenes" in drawn and "anchors 3 ≥ 3 scenes: no image follows them" in drawn
    page.screenshot("extension-story-prompts")
    assert page.evaluate("() => window.__spectralInjected === undefined && !document.querySelector('img[src=\"x\"]')")

    # The story link alone (no sampler yet) is enough to find the attention node.
    if page.evaluate("() => LiteGraph.registered_node_types.SpectralAnchorAttention.nodeData.input.optional"
                     "?.story !== undefined"):
        ids = build(page, [
            ["story", "SpectralStoryPrompts", [40, 60], None, {"scenes": "one\ntwo"}],
            ["attention", "SpectralAnchorAttention", [520, 60], None, {"anchors": 2}],
        ], [["story", "SPECTRAL_STORY", "attention", "story"]])
        assert hints(page, ids["attention"])[0] == {"text": "anchors 2 of 2", "warning": False}
        assert hints(page, ids["story"])[-1]["warning"] is True


def test_feature_injection_warns_when_its_settings_turn_it_off(page: AppPage) -> None:
    if not registered(page, "SpectralFeatureInjection"):
        pytest.skip("SpectralFeatureInjection is not in the pack yet")
    ids = build(page, [["injection", "SpectralFeatureInjection", [40, 60], None, {}]], [])
    assert hints(page, ids["injection"]) == []  # the defaults inject
    set_widget(page, ids["injection"], "end_percent", 0.05)
    set_widget(page, ids["injection"], "start_percent", 0.1)
    assert hints(page, ids["injection"]) == [{"text": "injection off: end ≤ start", "warning": True}]
    set_widget(page, ids["injection"], "strength", 0.0)
    assert hints(page, ids["injection"]) == [{"text": "injection off: strength 0", "warning": True}]
    assert "injection off: strength 0" in page.evaluate(DRAWN_TEXT_JS)


# ---------------------------------------------------------------- both renderers, pinned and newest frontend

INFO = {"color": (0xE8, 0xE6, 0xFF), "background": (0x4A, 0x3F, 0x8C)}
WARNING = {"color": (0x1A, 0x10, 0x00), "background": (0xF0, 0xA0, 0x30)}
RENDER_WAIT_S = 8.0  # the Vue renderer shows a change after the extension's next refresh (events or 0.4 s poll)
STORY_TEXT_BOXES = ("scenes", "style", "negative")


def rendered(page: RenderedPage, node_id: int) -> list[dict]:
    """The node's hint pills as rendered: text, colour, background (RGB tuples), visible."""
    result = page.app.evaluate(RENDERED_HINTS_JS, node_id)
    assert result["pills"] is not None, f"node {node_id} has no element in the {page.name} renderer"
    return [{**pill, "color": css_color(pill["color"]), "background": css_color(pill["background"])}
            for pill in result["pills"]]


def wait_for_pills(page: RenderedPage, node_id: int, expected: dict[str, dict], absent: tuple[str, ...] = ()
                   ) -> list[dict]:
    """Wait until every expected text is rendered with its colours and no absent text is; returns the pills.
    Fails with what was rendered instead."""
    deadline = time.monotonic() + RENDER_WAIT_S
    while True:
        pills = rendered(page, node_id)
        by_text = {pill["text"]: pill for pill in pills}
        missing = {text: colors for text, colors in expected.items()
                   if not (text in by_text and by_text[text]["visible"]
                           and by_text[text]["color"] == colors["color"]
                           and by_text[text]["background"] == colors["background"])}
        present = [text for text in absent if text in by_text]
        if not missing and not present:
            return pills
        if time.monotonic() > deadline:
            page.app.screenshot(f"failed-{page.name}-node{node_id}")
            raise AssertionError(f"{page.name}: node {node_id} should show {missing} and not {present}; "
                                 f"rendered: {pills}")
        time.sleep(0.1)


def change_widget(page: RenderedPage, node_id: int, name: str, value: object) -> None:
    """Set a widget as the frontend's own widget components do: the value, then the widget's callback."""
    page.app.evaluate("([id, name, value]) => { const w = app.graph.getNodeById(id).widgets.find((w) => w.name"
                      " === name); w.value = value; w.callback?.(w.value); }", [node_id, name, value])


FRESH_NODE_IDS = itertools.count(1000, 100)


def build_on(page: RenderedPage, nodes: list, links: list) -> dict[str, int]:
    # Fresh ids: comfyui-frontend-package 1.58.x's Vue renderer keeps a node component's badge list when a cleared
    # graph is refilled with a node of the same id (its own source badge then goes missing too).
    return page.app.evaluate(BUILD_GRAPH_JS, {"nodes": nodes, "links": links, "scale": 1.0, "offset": [20, 90],
                                              "firstId": next(FRESH_NODE_IDS)})


def assert_no_unknown_errors(page: RenderedPage) -> None:
    errors = page.app.take_unknown_errors()
    assert not errors, f"{page.name}: console errors (known frontend noise excluded: {KNOWN_CONSOLE_ERRORS}): {errors}"


def test_hints_render_with_their_colours_and_follow_changes(rendered_page: RenderedPage) -> None:
    page = rendered_page
    ids = build_on(page, [
        ["story", "SpectralStoryPrompts", [40, 60], [420, 560], {"scenes": "one\ntwo\nthree"}],
        ["attention", "SpectralAnchorAttention", [520, 60], None, {"anchors": 2}],
        ["keys", "SpectralTruncate", [520, 520], None, {"mode": "quantile", "value": 0.05}],
        ["sampler", "KSampler", [940, 60], None, {}],
    ], [
        ["story", "CONDITIONING", "sampler", "positive"],
        ["story", "LATENT", "sampler", "latent_image"],
        ["attention", "MODEL", "sampler", "model"],
        ["keys", "SPECTRUM", "attention", "key_spectrum"],
    ])
    wait_for_pills(page, ids["story"], {"3 scenes": INFO})
    wait_for_pills(page, ids["attention"], {"anchors 2 of 3": INFO, "K: quantile(0.05)": INFO})
    wait_for_pills(page, ids["keys"], {"quantile(0.05)": INFO})
    if not page.vue:
        badges = page.app.evaluate(RENDERED_HINTS_JS, ids["attention"])["badges"]
        assert {"text": "anchors 2 of 3 · K: quantile(0.05)", "fgColor": "#e8e6ff", "bgColor": "#4a3f8c"} in badges
    page.app.screenshot(f"renderers-{page.name}-hints")

    # A widget of this node, a widget of another node, and a link: each change shows without any other event.
    change_widget(page, ids["keys"], "value", 0.0)
    wait_for_pills(page, ids["keys"], {"quantile(0)": INFO, "quantile needs 0 < value ≤ 1, not 0": WARNING},
                   absent=("quantile(0.05)",))
    wait_for_pills(page, ids["attention"], {"K: quantile(0)": INFO}, absent=("K: quantile(0.05)",))
    change_widget(page, ids["story"], "scenes", "one\ntwo")
    wait_for_pills(page, ids["attention"], {"anchors 2 of 2": INFO, "all 2 images are anchors": WARNING},
                   absent=("anchors 2 of 3",))
    wait_for_pills(page, ids["story"], {"2 scenes": INFO,
                                        "anchors 2 ≥ 2 scenes: no image follows them": WARNING})
    page.app.evaluate("(id) => app.graph.getNodeById(id).disconnectInput("
                      "app.graph.getNodeById(id).findInputSlot('key_spectrum'))", ids["attention"])
    wait_for_pills(page, ids["attention"], {"anchors 2 of 2": INFO}, absent=("K: quantile(0)",))
    page.app.screenshot(f"renderers-{page.name}-warnings")
    assert_no_unknown_errors(page)


def test_invalid_values_are_flagged_before_queueing(rendered_page: RenderedPage) -> None:
    page = rendered_page
    ids = build_on(page, [
        ["fixed", "SpectralTruncate", [40, 60], None, {"mode": "fixed", "value": 2.5}],
        ["energy", "SpectralTruncate", [40, 300], None, {"mode": "energy", "value": 2.0}],
        ["attention", "SpectralAnchorAttention", [460, 60], None, {"anchors": 2, "subject_masks": True}],
        ["story", "SpectralStoryPrompts", [860, 60], [420, 560], {}],
    ], [])
    wait_for_pills(page, ids["fixed"], {"fixed keeps a whole number ≥ 1, not 2.5": WARNING})
    wait_for_pills(page, ids["energy"], {"energy needs 0 < value ≤ 1, not 2": WARNING})
    wait_for_pills(page, ids["attention"], {"subject_masks needs the story input": WARNING})
    change_widget(page, ids["fixed"], "value", 8.0)
    wait_for_pills(page, ids["fixed"], {"fixed(8)": INFO}, absent=("fixed keeps a whole number ≥ 1, not 2.5",))

    # Connecting the story clears the warning. Without an `anchors` input on the story node nothing is compared.
    page.app.evaluate("([story, attention]) => { const s = app.graph.getNodeById(story); const a ="
                      " app.graph.getNodeById(attention); s.connect(s.outputs.findIndex((o) => o.type ==="
                      " 'SPECTRAL_STORY'), a, a.findInputSlot('story')); }", [ids["story"], ids["attention"]])
    pills = wait_for_pills(page, ids["attention"], {"anchors 2 of 3": INFO},
                           absent=("subject_masks needs the story input",))
    assert all(pill["background"] != WARNING["background"] for pill in pills), pills
    story_pills = wait_for_pills(page, ids["story"], {"3 scenes": INFO})
    assert all(pill["background"] != WARNING["background"] for pill in story_pills), story_pills

    # With the story's anchors / images_per_batch inputs (SpectralStoryPrompts gains them with long stories):
    # the installed schema's widgets when it has them, else widgets of those names added here.
    page.app.evaluate("(id) => { const s = app.graph.getNodeById(id); for (const [name, value] of"
                      " [['anchors', 2], ['images_per_batch', 0]]) { if (!s.widgets.find((w) => w.name === name))"
                      " s.addWidget('number', name, value, () => {}, {min: 0, max: 64, step: 10, precision: 0}); } }",
                      ids["story"])
    change_widget(page, ids["story"], "anchors", 3)
    wait_for_pills(page, ids["attention"], {"anchors 2 ≠ story's anchors 3": WARNING})
    change_widget(page, ids["story"], "anchors", 2)
    change_widget(page, ids["story"], "images_per_batch", 2)
    wait_for_pills(page, ids["story"], {"images_per_batch 2 must be 0 or > anchors 2": WARNING})
    wait_for_pills(page, ids["attention"], {"anchors 2 of 3": INFO}, absent=("anchors 2 ≠ story's anchors 3",))
    change_widget(page, ids["story"], "images_per_batch", 3)
    wait_for_pills(page, ids["story"], {"3 scenes": INFO}, absent=("images_per_batch 2 must be 0 or > anchors 2",))
    page.app.screenshot(f"renderers-{page.name}-invalid-values")
    assert_no_unknown_errors(page)


def test_workflow_strings_are_never_inserted_as_html(rendered_page: RenderedPage) -> None:
    page = rendered_page
    markup = '<img src="x" onerror="window.__spectralInjected=1"><b>bold</b>'
    ids = build_on(page, [
        ["keys", "SpectralTruncate", [40, 60], None, {"mode": "quantile", "value": 0.05}],
        ["story", "SpectralStoryPrompts", [460, 60], [420, 560], {"scenes": f"{markup}\nsecond"}],
    ], [])
    # A workflow can hold any combo value; the chain label writes it as it is.
    page.app.evaluate("([id, markup]) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'mode').value"
                      " = markup; }", [ids["keys"], markup])
    shown = wait_for_pills(page, ids["keys"], {})
    expected = f"{markup}(0.05)"[:59] + "…"
    deadline = time.monotonic() + RENDER_WAIT_S
    while expected not in [pill["text"] for pill in shown] and time.monotonic() < deadline:
        time.sleep(0.1)
        shown = rendered(page, ids["keys"])
    assert expected in [pill["text"] for pill in shown], shown
    page.app.page.wait_for_timeout(300)
    injected = page.app.evaluate("() => ({flag: window.__spectralInjected ?? null,"
                                 " images: document.querySelectorAll('img[src=\"x\"]').length,"
                                 " bold: [...document.querySelectorAll('b')].filter((b) => b.textContent === 'bold')"
                                 ".length})")
    assert injected == {"flag": None, "images": 0, "bold": 0}, injected
    assert_no_unknown_errors(page)


def test_story_text_boxes_are_labelled(rendered_page: RenderedPage) -> None:
    page = rendered_page
    ids = build_on(page, [["story", "SpectralStoryPrompts", [40, 60], [440, 620], {}]], [])
    page.app.page.wait_for_timeout(500)
    labels = page.app.evaluate("""([id, names]) => {
      const node = app.graph.getNodeById(id);
      const scope = LiteGraph.vueNodesMode ? document.querySelector(`[data-node-id="${id}"]`) : document;
      const result = {};
      for (const name of names) {
        const widget = node.widgets.find((w) => w.name === name);
        const box = LiteGraph.vueNodesMode
          ? scope.querySelector(`textarea[data-spectral-label="${name}"]`)
            ?? [...scope.querySelectorAll('textarea')].find((t) => t.id && scope.querySelector(`label[for="${t.id}"]`)
                 ?.textContent.trim() === name)
          : widget?.element;
        if (!box) { result[name] = null; continue; }
        const container = box.parentElement;
        const native = container.querySelector(':scope > label');
        const generated = getComputedStyle(container, '::before');
        const rect = box.getBoundingClientRect();
        result[name] = {
          label: native ? native.textContent.trim()
            : (generated.content && generated.content !== 'none' ? JSON.parse(generated.content) : null),
          native: Boolean(native),
          generatedShown: !native && generated.display !== 'none' && generated.visibility !== 'hidden',
          boxVisible: rect.width > 20 && rect.height > 20,
          placeholder: box.placeholder,
        };
      }
      return result;
    }""", [ids["story"], list(STORY_TEXT_BOXES)])
    page.app.screenshot(f"renderers-{page.name}-story-labels")
    for name in STORY_TEXT_BOXES:
        shown = labels[name]
        assert shown is not None, f"{page.name}: no text box found for {name}: {labels}"
        assert shown["label"] == name and shown["boxVisible"], f"{page.name}: {name} is not labelled: {shown}"
        # Renderers without their own label show the placeholder (the schema's, else the input name) when empty.
        assert shown["native"] or shown["placeholder"], f"{page.name}: {name} has no placeholder: {shown}"
    assert_no_unknown_errors(page)


def test_js_input_ranges_mirror_the_python_schemas(page: AppPage) -> None:
    ranges = page.evaluate("async () => (await import('/extensions/spectral-anchors/spectral_anchors.js'))"
                           ".INPUT_RANGES")
    info = page.server.get_json("/object_info")
    compared = 0
    for node_id, inputs in ranges.items():
        if node_id not in info:
            continue  # a node of another version of the pack
        schema = {**info[node_id]["input"].get("required", {}), **info[node_id]["input"].get("optional", {})}
        for name, expected in inputs.items():
            if name not in schema:
                continue  # an input this schema does not have (yet): the rules skip it too
            kind, options = schema[name][0], schema[name][1]
            assert kind in ("INT", "FLOAT"), f"{node_id}.{name} is {kind}"
            assert expected.get("integer", False) == (kind == "INT"), f"{node_id}.{name}: INT is integer"
            for bound in ("min", "max"):
                if bound in expected:
                    assert options.get(bound) == expected[bound], (
                        f"web/spectral_anchors.js INPUT_RANGES {node_id}.{name}.{bound} = {expected[bound]}, "
                        f"the schema says {options.get(bound)}")
            compared += 1
    assert compared >= 12, f"only {compared} ranges compared"
