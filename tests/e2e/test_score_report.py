"""The consistency score's report shows in the node, in both of the frontend's renderers (the classic LiteGraph
canvas and the Vue "Nodes 2.0" nodes, setting Comfy.VueNodes.Enabled), as text only.

The report reaches the page as the frontend's own "executed" event (the message the server sends when a node
returns a UI output), dispatched through the frontend's api object: executing the node itself needs a CLIP vision
file the server's Load CLIP Vision accepts, and ComfyUI's loader only recognises full-size encoders (see
test_consistency_score.py for the node's own run on a tiny encoder).
"""

from __future__ import annotations

import pytest
from e2e_support import BUILD_GRAPH_JS, AppPage

VUE_SETTING = "Comfy.VueNodes.Enabled"
REPORT = "Spectral Consistency Score\nscore: 0.8731 (mean over 2 target(s))\n    3  target  0.8731  <img src=x " \
         "onerror=\"window.__scoreInjected=1\">"

EXECUTED_JS = """
([id, text]) => window.comfyAPI.api.api.dispatchCustomEvent('executed',
  {node: String(id), display_node: String(id), output: {text: [text]}, prompt_id: 'spectral-score-test'})
"""

# Every text area of the page that is visible, with its value and whether it is read-only, and the node it sits
# over (its centre inside the node's box on screen).
SHOWN_JS = """
(id) => {
  const node = app.graph.getNodeById(id);
  const vue = document.querySelector(`[data-node-id="${id}"]`);
  const rect = vue ? vue.getBoundingClientRect() : (() => {
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
    const scale = app.canvas.ds.scale;
    return {left: canvas.left + x, top: canvas.top + y, right: canvas.left + x + node.size[0] * scale,
            bottom: canvas.top + y + (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * scale};
  })();
  return [...document.querySelectorAll('textarea')].filter((area) => area.offsetParent !== null).map((area) => {
    const box = area.getBoundingClientRect();
    const x = (box.left + box.right) / 2, y = (box.top + box.bottom) / 2;
    return {value: area.value, readOnly: area.readOnly,
            inNode: x >= rect.left && x <= rect.right && y >= rect.top && y <= rect.bottom};
  });
}
"""


@pytest.fixture(scope="module")
def page(app_page: AppPage) -> AppPage:
    app_page.take_errors()
    return app_page


def set_vue(page: AppPage, enabled: bool) -> None:
    page.evaluate("async ([name, value]) => { await app.extensionManager.setting.set(name, value); }",
                  [VUE_SETTING, enabled])
    page.page.wait_for_timeout(1500)  # the renderer switch re-mounts the nodes


def build_score_node(page: AppPage) -> int:
    ids = page.evaluate(BUILD_GRAPH_JS, {"nodes": [["score", "SpectralConsistencyScore", [120, 120], None,
                                                    {"anchors": 2}]], "links": [], "scale": 1.0, "offset": [20, 90]})
    page.page.wait_for_timeout(500)
    return ids["score"]


@pytest.mark.parametrize("vue", [False, True], ids=["classic", "vue_nodes"])
def test_report_shows_in_the_node(page: AppPage, vue: bool) -> None:
    try:
        set_vue(page, vue)
        node_id = build_score_node(page)
        if vue:
            assert page.evaluate("(id) => !!document.querySelector(`[data-node-id=\"${id}\"]`)", node_id), \
                "the Vue renderer did not draw the node"
        page.evaluate(EXECUTED_JS, [node_id, REPORT])
        page.page.wait_for_timeout(500)
        shown = page.evaluate(SHOWN_JS, node_id)
        assert {"value": REPORT, "readOnly": True, "inNode": True} in shown, shown
        page.screenshot(f"score-report-{'vue' if vue else 'classic'}")
        # A second run replaces the text.
        page.evaluate(EXECUTED_JS, [node_id, "second run"])
        page.page.wait_for_timeout(300)
        assert any(area["value"] == "second run" and area["inNode"] for area in page.evaluate(SHOWN_JS, node_id))
        # Text only: the markup in the report was never parsed.
        assert page.evaluate("() => window.__scoreInjected === undefined && !document.querySelector('img[src=\"x\"]')")
        # The report is output, not a setting: it is neither saved with the workflow nor sent with the prompt.
        saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", node_id)
        assert saved == [2]
        prompt = page.evaluate("async (id) => (await app.graphToPrompt()).output[String(id)].inputs", node_id)
        assert prompt == {"anchors": 2}
        assert not page.take_errors()
    finally:
        set_vue(page, False)


@pytest.mark.timeout(1800)
def test_the_node_runs_in_the_server_and_its_report_reaches_the_node(page: AppPage, tmp_path_factory) -> None:
    """The whole path: Load CLIP Vision loads a (random, full-size) ViT-L file, the server executes the score on
    two images, sends the report to this page, and the node shows it."""
    import subprocess
    import sys
    from pathlib import Path

    from e2e_support import graph_to_prompt

    builder = Path(__file__).resolve().parent / "build_clip_vision.py"
    weights = tmp_path_factory.mktemp("clip-vision-run") / "random_vit_l.safetensors"
    subprocess.run([sys.executable, str(builder), "--output", str(weights)], check=True, timeout=900)
    page.server.model_file("clip_vision", "score_test_vit_l.safetensors", target=weights)
    page.evaluate("async () => { await app.refreshComboInNodes?.(); }")
    ids = page.evaluate(BUILD_GRAPH_JS, {"nodes": [
        ["red", "EmptyImage", [40, 60], None, {"width": 96, "height": 64, "batch_size": 2, "color": 0xC02020}],
        ["blue", "EmptyImage", [40, 300], None, {"width": 96, "height": 64, "batch_size": 1, "color": 0x2040C0}],
        ["batch", "ImageBatch", [360, 60], None, {}],
        ["vision", "CLIPVisionLoader", [360, 300], None, {"clip_name": "score_test_vit_l.safetensors"}],
        ["score", "SpectralConsistencyScore", [700, 60], None, {"anchors": 2}],
        ["preview", "PreviewImage", [1200, 60], None, {}],
    ], "links": [
        ["red", "IMAGE", "batch", "image1"], ["blue", "IMAGE", "batch", "image2"],
        ["batch", "IMAGE", "score", "images"], ["vision", "CLIP_VISION", "score", "clip_vision"],
        ["score", "chart", "preview", "images"],
    ], "scale": 1.0, "offset": [20, 90]})
    prompt = graph_to_prompt(page)
    client_id = page.evaluate("() => window.comfyAPI.api.api.clientId")
    status, answer = page.server.request("/prompt", {"prompt": prompt["output"], "client_id": client_id})
    assert status == 200, answer
    entry = page.server.wait_for_history(answer["prompt_id"], 900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][str(ids["score"])]["text"][0]
    # Two red anchors, one blue target: the anchors agree with each other exactly, the target less.
    assert report.startswith("Spectral Consistency Score\nencoder: CLIP ViT-L/14 (clip_vision_model, 24 layers, "
                             "width 1024, 224 px input), 768-d embeddings"), report
    rows = [line.split() for line in report.splitlines() if line.strip()[:1].isdigit()]
    assert [row[1] for row in rows] == ["anchor", "anchor", "target"]
    assert float(rows[0][2]) == pytest.approx(1.0, abs=1e-3) and float(rows[2][2]) < float(rows[0][2])
    page.page.wait_for_timeout(500)
    assert {"value": report, "readOnly": True, "inNode": True} in page.evaluate(SHOWN_JS, ids["score"])
    assert len(entry["outputs"][str(ids["preview"])]["images"]) == 1  # the chart
