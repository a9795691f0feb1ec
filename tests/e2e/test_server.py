"""The real ComfyUI server with the pack linked into custom_nodes: it loads, and it describes itself completely."""

from __future__ import annotations

import re
import urllib.parse

import pytest
from e2e_support import PACK_CATEGORY, PACK_FOLDER, PACK_ROOT, ComfyServer, pack_node_ids, workflow_paths

NODE_IDS = pack_node_ids()
JS_FILES = sorted(path.relative_to(PACK_ROOT / "web").as_posix() for path in (PACK_ROOT / "web").rglob("*.js"))


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict:
    return comfy_server.get_json("/object_info")


def visible_inputs(info: dict) -> dict[str, object]:
    """Required and optional inputs (hidden ones such as unique_id are not shown to users)."""
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def test_pack_imports_without_failure(comfy_server: ComfyServer) -> None:
    log = comfy_server.log()
    timing = re.search(rf"^\s*[\d.]+ seconds(?P<failed> \(IMPORT FAILED\))?: \S*custom_nodes/{PACK_FOLDER}$", log,
                       re.MULTILINE)
    assert timing, f"the pack is missing from ComfyUI's custom node import times:\n{log[-4000:]}"
    assert not timing.group("failed"), f"ComfyUI reports IMPORT FAILED for the pack:\n{log[-4000:]}"
    for failure in ("Cannot import", "Error while calling comfy_entrypoint", "did not return"):
        # The pack's own path, not just its folder name: ComfyUI's tree may live inside the checkout (.comfy-state).
        lines = [line for line in log.splitlines() if failure in line and f"custom_nodes/{PACK_FOLDER}" in line]
        assert not lines, "\n".join(lines)


def test_object_info_lists_exactly_the_pack_nodes(object_info: dict) -> None:
    assert NODE_IDS, "node_list() returned no nodes"
    missing = [node_id for node_id in NODE_IDS if node_id not in object_info]
    assert not missing, f"registered by node_list() but absent from /object_info: {missing}"
    in_category = sorted(name for name, info in object_info.items()
                         if str(info.get("category", "")).split("/")[0] == PACK_CATEGORY)
    assert in_category == NODE_IDS, "every pack node, and only those, sits in the pack's category"
    for node_id in NODE_IDS:
        # The frontend derives the help page URL and the source badge from python_module.
        assert object_info[node_id]["python_module"] == f"custom_nodes.{PACK_FOLDER}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_is_described_and_every_input_has_a_tooltip(object_info: dict, node_id: str) -> None:
    info = object_info[node_id]
    assert info.get("display_name") and info["display_name"] != node_id
    assert len(info.get("description") or "") >= 40, f"{node_id} needs a description that says what it does"
    inputs = visible_inputs(info)
    assert inputs, f"{node_id} lists no inputs"
    untipped = [name for name, spec in inputs.items()
                if len(spec) < 2 or not isinstance(spec[1], dict) or not str(spec[1].get("tooltip") or "").strip()]
    assert not untipped, f"{node_id}: inputs without a tooltip: {untipped}"


def test_extensions_list_and_serve_the_pack_js(comfy_server: ComfyServer) -> None:
    assert "spectral_anchors.js" in JS_FILES
    listed = comfy_server.get_json("/extensions")
    prefix = f"/extensions/{urllib.parse.quote(PACK_FOLDER)}/"
    assert sorted(url[len(prefix):] for url in listed if url.startswith(prefix)) == JS_FILES
    for name in JS_FILES:
        status, body = comfy_server.request(prefix + name)
        assert status == 200 and "registerExtension" in body


def test_pack_js_never_writes_html() -> None:
    # Workflow strings must reach the page as text only (canvas fillText / textContent).
    for name in JS_FILES:
        source = (PACK_ROOT / "web" / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"web/{name} uses {sink}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_is_served_where_the_frontend_looks(comfy_server: ComfyServer, object_info: dict,
                                                      node_id: str) -> None:
    # comfyui-frontend-package 1.32.9 (NodeHelpService.fetchCustomNodeHelp): for python_module "custom_nodes.<pack>"
    # it fetches /extensions/<pack>/docs/<node>/<locale>.md, then /extensions/<pack>/docs/<node>.md.
    pack = object_info[node_id]["python_module"].split(".")[1].split("@")[0]
    status, page = comfy_server.request(f"/extensions/{urllib.parse.quote(pack)}/docs/{node_id}.md")
    assert status == 200, f"web/docs/{node_id}.md is missing"
    assert page.startswith("# "), "a help page starts with the node's title"
    undocumented = [name for name in visible_inputs(object_info[node_id]) if f"`{name}`" not in page]
    assert not undocumented, f"web/docs/{node_id}.md does not explain inputs {undocumented}"


def test_template_browser_lists_every_workflow_with_a_thumbnail(comfy_server: ComfyServer) -> None:
    names = sorted(path.stem for path in workflow_paths())
    if not names:
        pytest.skip("no workflows/*.json yet")
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == names
    for name in names:
        quoted = urllib.parse.quote(name)  # the titles have spaces and commas
        status, workflow = comfy_server.request(f"/api/workflow_templates/{PACK_FOLDER}/{quoted}.json")
        assert status == 200 and isinstance(workflow, dict) and workflow.get("nodes")
        # The template browser shows <name>.jpg for custom-node templates (useTemplateWorkflows.ts).
        status, _ = comfy_server.request(f"/api/workflow_templates/{PACK_FOLDER}/{quoted}.jpg")
        assert status == 200, f"workflows/{name}.jpg (the template browser's thumbnail) is missing"
