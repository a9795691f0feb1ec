"""What a new user meets first, in the real frontend (headless Chromium) in both renderers (the classic LiteGraph
canvas and Nodes 2.0, setting Comfy.VueNodes.Enabled): the node search finds the pack by the words an artist types,
the template browser shows the workflows with titles that say where to start and drawn thumbnails, and the
Consistent Character preset sits in the character sheet and reaches the queued prompt."""

from __future__ import annotations

import json

import pytest
from e2e_support import (
    DRAWN_TEXT_JS,
    LOAD_WORKFLOW_JS,
    PACK_FOLDER,
    WORKFLOW_DIR,
    AppPage,
    graph_to_prompt,
    workflow_paths,
)
from workflow_graphs import TITLES, WORKFLOWS

SEARCH_TERMS = ("consistent", "character", "sheet", "story", "anchor")
RENDERERS = {"classic": False, "vue": True}
SHEET = WORKFLOW_DIR / f"{WORKFLOWS['spectral_character_sheet_sdxl'].title}.json"
QUEUE_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def page(app_page: AppPage) -> AppPage:
    app_page.take_errors()  # a fresh user's start-up 404s are the app's own
    return app_page


@pytest.fixture(scope="module")
def display_names(page: AppPage) -> set[str]:
    object_info = page.server.get_json("/object_info")
    return {info["display_name"] for info in object_info.values() if info.get("python_module", "").startswith(
        "custom_nodes.") and info["category"].split("/")[0] == "spectral_anchors"}


@pytest.fixture(params=list(RENDERERS))
def renderer(request, page: AppPage) -> str:
    page.evaluate("(on) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)", RENDERERS[request.param])
    page.evaluate("() => app.graph.clear()")
    page.page.wait_for_timeout(500)
    yield request.param
    page.page.keyboard.press("Escape")
    page.evaluate("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")


def search_results(page: AppPage, term: str) -> list[str]:
    """Double-click the empty canvas, type the term into the node search box, read the offered nodes."""
    page.page.keyboard.press("Escape")
    box = page.page.locator("#graph-canvas").bounding_box()
    page.page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    search = page.page.locator(".p-autocomplete-input, input[role=combobox]").first
    search.wait_for(state="visible", timeout=15_000)
    search.fill(term)
    page.page.wait_for_timeout(800)
    options = page.page.locator("li.p-autocomplete-option")
    texts = [text.split("\n")[0].replace("\xa0", " ").strip() for text in options.all_inner_texts()]
    page.page.keyboard.press("Escape")
    return texts


@pytest.mark.parametrize("term", SEARCH_TERMS)
def test_canvas_search_finds_the_pack_by_an_artists_words(page: AppPage, renderer: str, display_names: set[str],
                                                          term: str) -> None:
    results = search_results(page, term)
    page.screenshot(f"artists-search-{term}-{renderer}")
    found = [name for name in results if name in display_names]
    assert found, f"searching {term!r} offers none of the pack's nodes; it offers {results[:10]}"
    assert any(term in name.lower() for name in found)


def test_node_library_lists_the_pack_under_its_names(page: AppPage, renderer: str, display_names: set[str]) -> None:
    page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
    library = page.page.locator(".side-bar-panel, .sidebar-content-container").first
    library.wait_for(state="visible", timeout=15_000)
    try:
        search = library.locator("input").first
        for term in SEARCH_TERMS:
            search.fill(term)
            page.page.wait_for_timeout(800)
            shown = library.inner_text()
            assert any(name in shown for name in display_names if term in name.lower()), (
                f"the node library's search for {term!r} shows none of the pack's nodes:\n{shown[:1500]}")
        page.screenshot(f"artists-library-{renderer}")
    finally:
        page.evaluate("() => app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")


def test_template_browser_shows_titles_in_order_with_thumbnails(page: AppPage, renderer: str) -> None:
    page.evaluate("() => app.extensionManager.setting.set('Comfy.Templates.SortBy', 'alphabetical')")
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.page.locator("[role=dialog]").last
    dialog.get_by_text(PACK_FOLDER, exact=True).first.click()
    titles = [WORKFLOWS[name].title for name in TITLES]
    for title in titles:
        dialog.get_by_text(title, exact=True).first.wait_for(state="visible", timeout=15_000)
    page.page.wait_for_timeout(1500)  # thumbnails load lazily
    page.screenshot(f"artists-templates-{renderer}")
    boxes = [dialog.get_by_text(title, exact=True).first.bounding_box() for title in titles]
    reading_order = sorted(range(len(titles)), key=lambda index: (round(boxes[index]["y"]), boxes[index]["x"]))
    assert [titles[index] for index in reading_order] == titles
    assert titles[0].startswith("1 Character sheet") and "start here" in titles[0]
    # The cards fetch each thumbnail (/api/workflow_templates/<pack>/<title>.jpg) and show it as a blob: URL once
    # decoded; every one of the pack's cards must show a decoded image.
    decoded_js = ("() => Array.from(document.querySelectorAll('[role=dialog] img')).filter((img) => "
                  "img.complete && img.naturalWidth > 0).length")
    # The pack's other templates are cards too; the dialog renders off-screen cards' images lazily.
    page.page.wait_for_function(f"(count) => ({decoded_js})() >= count", arg=len(titles), timeout=30_000)
    sources = page.evaluate("() => Array.from(document.querySelectorAll('[role=dialog] img')).map((img) => img.src)")
    assert len(titles) <= len(sources) <= len(workflow_paths()), f"one thumbnail per card expected: {sources}"
    # Opening the first template loads the character sheet with the preset in it.
    dialog.get_by_text(titles[0], exact=True).first.click()
    page.page.wait_for_function("() => app.graph.nodes.some((n) => n.type === 'SpectralConsistencyPreset')",
                                timeout=15_000)
    page.evaluate("() => app.extensionManager.setting.set('Comfy.Templates.SortBy', 'default')")


def test_character_sheet_starts_from_the_recommended_preset(page: AppPage, renderer: str) -> None:
    page.take_errors()  # the template browser's own 404 for ComfyUI's core template index is not the pack's
    workflow = json.loads(SHEET.read_text())
    loaded = page.evaluate(LOAD_WORKFLOW_JS, workflow)
    assert all(node["registered"] and not node["has_errors"] for node in loaded["nodes"])
    preset = next(node["id"] for node in workflow["nodes"] if node["type"] == "SpectralConsistencyPreset")
    widget = page.evaluate("(id) => { const w = app.graph.getNodeById(id).widgets.find((w) => w.name === 'preset');"
                           " return {value: w.value, options: w.options.values}; }", preset)
    assert widget["value"] == "recommended"
    assert widget["options"][:1] == ["recommended"] and {"stronger identity", "more variety",
                                                        "less background leakage", "custom"} <= set(widget["options"])
    page.page.wait_for_timeout(500)
    page.screenshot(f"artists-preset-{renderer}")
    if renderer == "vue":
        shown = page.page.locator(f'[data-node-id="{preset}"]').inner_text()
    else:
        shown = " ".join(page.evaluate(DRAWN_TEXT_JS))
    assert "recommended" in shown and "Consistent Character" in shown, shown[:800]

    page.evaluate("(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'preset').value ="
                  " 'stronger identity'; }", preset)
    prompt = graph_to_prompt(page)
    assert prompt["output"][str(preset)]["inputs"]["preset"] == "stronger identity"
    status, answer = page.server.queue(prompt["output"], prompt["workflow"])
    assert status == 200 and answer.get("node_errors") == {}, json.dumps(answer)[:2000]
    page.server.wait_for_history(answer["prompt_id"], QUEUE_TIMEOUT)
    assert not page.take_errors()
