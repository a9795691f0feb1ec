"""Write workflows/anchor_attention_basic.json (and its template-browser thumbnail) with the real frontend.

The graph is built in the page with the LiteGraph API and exported with app.graph.serialize(), so the file is
exactly what the pinned frontend saves. Run it again after changing the graph below:

    .venv/bin/python tests/e2e/export_workflow.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_support import (  # noqa: E402
    BUILD_GRAPH_JS,
    WORKFLOW_DIR,
    launch_chromium,
    open_app,
    start_server,
    stop_server,
)

NAME = "anchor_attention_basic"
CHECKPOINT = "sd_xl_base_1.0.safetensors"
NOTE = """Spectral Anchor Attention: the basics

One prompt, a batch of 4: the first 2 images are anchors, and every image also attends to the anchors' keys
and values in the UNet's self-attention, so the fox keeps the same look across the batch.

- anchors: how many of the first images are anchors (2, the research default). Keep it below the batch size.
- layers: decoder = the UNet's output blocks (ConsiStory's choice). More layers: more identity, more background
  leaking between images.
- start_percent 0.01: the first step stays plain so every image lays itself out freely.
- end_percent 1.0: share until the end. At or below start_percent sharing is off.
- key_spectrum / value_spectrum (unconnected here): spectral filters for the anchors' keys and values.

The badge above the attention node shows anchors N of the batch and warns about settings that do nothing.
Put your SDXL checkpoint in the loader. Swap the prompt for Spectral Story Prompts to give every image its own
scene."""

# Nodes: (key, type, position, size or None, {widget: value}); links: (from key, output, to key, input).
NODES = [
    ("note", "Note", [40, 40], [420, 420], {"text": NOTE}),
    ("loader", "CheckpointLoaderSimple", [40, 500], None, {"ckpt_name": CHECKPOINT}),
    ("attention", "SpectralAnchorAttention", [500, 40], None,
     {"anchors": 2, "layers": "decoder", "start_percent": 0.01, "end_percent": 1.0}),
    ("positive", "CLIPTextEncode", [500, 420], [400, 160],
     {"text": "a photo of a red fox wearing a blue scarf, sitting in a cozy library, cinematic, highly detailed"}),
    ("negative", "CLIPTextEncode", [500, 620], [400, 140], {"text": "blurry, lowres, deformed, watermark, text"}),
    ("latent", "EmptyLatentImage", [500, 800], None, {"width": 1024, "height": 1024, "batch_size": 4}),
    ("sampler", "KSampler", [960, 260], None,
     {"seed": 42, "control_after_generate": "fixed", "steps": 30, "cfg": 5.0, "sampler_name": "dpmpp_2m",
      "scheduler": "karras", "denoise": 1.0}),
    ("decode", "VAEDecode", [1320, 260], None, {}),
    ("save", "SaveImage", [1540, 260], [360, 420], {"filename_prefix": "spectral_anchors/anchor_attention_basic"}),
]
LINKS = [
    ("loader", "MODEL", "attention", "model"),
    ("attention", "MODEL", "sampler", "model"),
    ("loader", "CLIP", "positive", "clip"),
    ("loader", "CLIP", "negative", "clip"),
    ("positive", "CONDITIONING", "sampler", "positive"),
    ("negative", "CONDITIONING", "sampler", "negative"),
    ("latent", "LATENT", "sampler", "latent_image"),
    ("sampler", "LATENT", "decode", "samples"),
    ("loader", "VAE", "decode", "vae"),
    ("decode", "IMAGE", "save", "images"),
]

# A clean canvas for the thumbnail: no minimap, no render statistics, no menus (focus mode).
CLEAN_CANVAS_JS = """
async () => {
  await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
  await app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false);
  await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
}
"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="spectral-export-") as scratch:
        base = Path(scratch) / "base"
        base.mkdir()
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "models" / "checkpoints" / CHECKPOINT).touch()
        server = start_server(base)
        try:
            with sync_playwright() as playwright:
                context = launch_chromium(playwright, Path(scratch) / "profile")
                try:
                    page = open_app(context, server)
                    page.take_errors()  # the frontend's own start-up noise (404s of a fresh user) is not ours
                    # A stable id per workflow name, so re-exporting gives the same file.
                    graph_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"spectral-anchors/workflows/{NAME}"))
                    page.evaluate(CLEAN_CANVAS_JS)
                    page.evaluate(BUILD_GRAPH_JS, {"nodes": NODES, "links": LINKS, "graphId": graph_id,
                                                   "scale": 0.8, "offset": [20, 90]})
                    # JSON.stringify in the page, as the frontend's Save does: it drops undefined fields, which
                    # Playwright would hand over as null (and the frontend's schema rejects those nulls).
                    workflow = json.loads(page.evaluate("() => JSON.stringify(app.graph.serialize())"))
                    page.page.wait_for_timeout(1000)
                    WORKFLOW_DIR.mkdir(exist_ok=True)
                    (WORKFLOW_DIR / f"{NAME}.json").write_text(json.dumps(workflow, indent=2) + "\n")
                    # The template browser shows <name>.jpg: the graph itself, as the frontend draws it.
                    shot = Path(scratch) / "graph.png"
                    page.page.screenshot(path=str(shot))
                    errors = page.take_errors()
                finally:
                    context.close()
        finally:
            stop_server(server)
        from PIL import Image

        with Image.open(shot) as image:
            image.convert("RGB").resize((800, 500), Image.LANCZOS).save(WORKFLOW_DIR / f"{NAME}.jpg", quality=85)
    print(f"wrote {WORKFLOW_DIR / NAME}.json and .jpg; page errors: {errors or 'none'}")


if __name__ == "__main__":
    main()
