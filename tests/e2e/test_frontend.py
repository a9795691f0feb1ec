"""The real frontend (comfyui-frontend-package, as pinned) in headless Chromium, against the real server.

Every example workflow loads with no missing node and no error and converts to a prompt that /prompt accepts;
the pack's node types are registered; the pack's extension is loaded and draws the hints it promises.
Screenshots go to artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_support import (
    BUILD_GRAPH_JS,
    DRAWN_TEXT_JS,
    LOAD_WORKFLOW_JS,
    WORKFLOW_DIR,
    AppPage,
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
