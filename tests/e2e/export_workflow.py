"""Write the example workflows of workflows/ with the real frontend (thumbnails: scripts/draw_thumbnails.py).

Each graph of workflow_graphs.py is built in the page with the LiteGraph API and exported with
app.graph.serialize(), so every file is exactly what the pinned frontend saves. Run it again after changing a graph:

    .venv/bin/python tests/e2e/export_workflow.py            # every workflow
    .venv/bin/python tests/e2e/export_workflow.py NAME ...   # only these
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_support import (  # noqa: E402
    ARTIFACTS,
    BUILD_GRAPH_JS,
    MODEL_LOADERS,
    WORKFLOW_DIR,
    launch_chromium,
    open_app,
    start_server,
    stop_server,
)
from workflow_graphs import WORKFLOWS, WorkflowGraph  # noqa: E402

# A clean canvas for the thumbnail: no minimap, no render statistics, no menus (focus mode).
CLEAN_CANVAS_JS = """
async () => {
  await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
  await app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false);
  // Draw text at every zoom: the thumbnails of the bigger graphs are taken zoomed out, below the level at which
  // the canvas would otherwise switch to text-less boxes.
  await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
  await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
}
"""

# Titles for nodes of the graph just built: {node id: title}.
SET_TITLES_JS = """
(titles) => {
  for (const [id, title] of Object.entries(titles)) app.graph.getNodeById(Number(id)).title = title;
}
"""

# Groups (titled frames on the canvas) for the graph just built: [title, [x, y, w, h], colour].
ADD_GROUPS_JS = """
(groups) => {
  for (const [title, bounding, color] of groups) {
    const group = new LiteGraph.LGraphGroup(title);
    group.pos = [bounding[0], bounding[1]];
    group.size = [bounding[2], bounding[3]];
    if (color) group.color = color;
    app.graph.add(group);
  }
  app.graph.setDirtyCanvas(true, true);
}
"""

# The view: fit = every node and group inside the window, centred, with a margin (for the thumbnail); otherwise the
# top-left corner of the graph (the overview note) at the given scale, where text is still drawn (for the saved file).
SET_VIEW_JS = """
({margin, scale}) => {
  const OPENING_MARGIN = [90, 130];
  const boxes = [...app.graph.nodes.map((n) => n.boundingRect), ...app.graph.groups.map((g) => g._bounding)];
  const left = Math.min(...boxes.map((b) => b[0])), top = Math.min(...boxes.map((b) => b[1]));
  const right = Math.max(...boxes.map((b) => b[0] + b[2])), bottom = Math.max(...boxes.map((b) => b[1] + b[3]));
  const width = app.canvas.canvas.clientWidth, height = app.canvas.canvas.clientHeight;
  if (scale === null) {
    const fit = Math.min((width - 2 * margin) / (right - left), (height - 2 * margin) / (bottom - top), 1);
    app.canvas.ds.scale = Math.floor(fit * 100) / 100;
    app.canvas.ds.offset = [Math.round((width / app.canvas.ds.scale - (right - left)) / 2 - left),
                            Math.round((height / app.canvas.ds.scale - (bottom - top)) / 2 - top)];
  } else {
    // Clear of the frontend's side bar and tab bar, which overlap the canvas.
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [Math.round(OPENING_MARGIN[0] / scale - left), Math.round(OPENING_MARGIN[1] / scale - top)];
  }
  app.graph.setDirtyCanvas(true, true);
}
"""

VIEW_MARGIN = 24
# The saved view of the bigger graphs: readable at once (the canvas hides text below about 0.6), overview note first.
OPENING_SCALE = 0.65


def model_files(graphs: list[WorkflowGraph]) -> set[tuple[str, str]]:
    """(models/ folder, file name) of every file the graphs' loader nodes name (the first widget of each)."""
    files = set()
    for graph in graphs:
        for _, node_type, _, _, widgets, *_ in graph.nodes:
            if node_type in MODEL_LOADERS and widgets:
                files.add((MODEL_LOADERS[node_type], next(iter(widgets.values()))))
    return files


def export(page: object, graph: WorkflowGraph, scratch: Path) -> tuple[Path, list[str]]:
    """Build one graph in the page, save its JSON to workflows/, screenshot it; returns the screenshot, errors."""
    # A stable id per workflow name, so re-exporting gives the same file.
    graph_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"spectral-anchors/workflows/{graph.name}"))
    scale, offset = graph.view if graph.view else (1.0, [0, 0])
    ids = page.evaluate(BUILD_GRAPH_JS, {"nodes": [node[:5] for node in graph.nodes], "links": graph.links,
                                         "graphId": graph_id, "scale": scale, "offset": offset})
    titles = {ids[node[0]]: node[5] for node in graph.nodes if len(node) > 5}
    if titles:
        page.evaluate(SET_TITLES_JS, titles)
    if graph.groups:
        page.evaluate(ADD_GROUPS_JS, graph.groups)
    if graph.view is None:
        page.evaluate(SET_VIEW_JS, {"margin": VIEW_MARGIN, "scale": OPENING_SCALE})
    # JSON.stringify in the page, as the frontend's Save does: it drops undefined fields, which Playwright would
    # hand over as null (and the frontend's schema rejects those nulls).
    workflow = json.loads(page.evaluate("() => JSON.stringify(app.graph.serialize())"))
    WORKFLOW_DIR.mkdir(exist_ok=True)
    (WORKFLOW_DIR / f"{graph.title}.json").write_text(json.dumps(workflow, indent=2) + "\n")
    if graph.view is None:
        page.evaluate(SET_VIEW_JS, {"margin": VIEW_MARGIN, "scale": None})  # the whole graph in the thumbnail
    page.page.wait_for_timeout(1000)
    # The whole graph as the frontend draws it, to review the layout (the template browser's thumbnail is a
    # drawing of what the workflow makes: scripts/draw_thumbnails.py).
    shot = scratch / f"{graph.name}.png"
    page.page.screenshot(path=str(shot))
    return shot, page.take_errors()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"workflows to export (default: all): {', '.join(WORKFLOWS)}")
    names = parser.parse_args().names or list(WORKFLOWS)
    unknown = [name for name in names if name not in WORKFLOWS]
    if unknown:
        parser.error(f"unknown workflow(s) {', '.join(unknown)}; known: {', '.join(WORKFLOWS)}")
    graphs = [WORKFLOWS[name] for name in names]

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="spectral-export-") as scratch_dir:
        scratch = Path(scratch_dir)
        base = scratch / "base"
        for folder, name in model_files(graphs):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / name).touch()
        server = start_server(base)
        report = {}
        try:
            with sync_playwright() as playwright:
                context = launch_chromium(playwright, scratch / "profile")
                try:
                    page = open_app(context, server)
                    page.take_errors()  # the frontend's own start-up noise (404s of a fresh user) is not ours
                    page.evaluate(CLEAN_CANVAS_JS)
                    for graph in graphs:
                        shot, errors = export(page, graph, scratch)
                        ARTIFACTS.mkdir(exist_ok=True)
                        shutil.copyfile(shot, ARTIFACTS / f"export-{graph.name}.png")
                        report[graph.name] = errors
                finally:
                    context.close()
        finally:
            stop_server(server)
    for name, errors in report.items():
        print(f"wrote {WORKFLOW_DIR / WORKFLOWS[name].title}.json; page errors: {errors or 'none'}")


if __name__ == "__main__":
    main()
