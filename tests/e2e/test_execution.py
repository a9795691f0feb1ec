"""A shipped workflow runs to completion through /prompt on the real server, on a full-size SDXL checkpoint.

No real weights exist here, so the test builds an SDXL checkpoint with random weights with ComfyUI's own classes
(build_sdxl_checkpoint.py; cached in .comfy-state/cache/, reused when present). CheckpointLoaderSimple detects it
as SDXL, so every node of the workflow runs for real, at reduced size and steps; the images are noise.
Heavy: about 1-2 min to build once (7.8 GB peak), then about 30-60 s and 13 GB of server memory per run. It runs
in `make test` and is skipped, with the reason, on machines with less than 16 GiB of available memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from build_sdxl_checkpoint import DEFAULT_OUTPUT
from e2e_support import ARTIFACTS, LOAD_WORKFLOW_JS, AppPage, ComfyServer, graph_to_prompt, workflow_paths
from PIL import Image
from workflow_graphs import WORKFLOWS

BUILDER = Path(__file__).resolve().parent / "build_sdxl_checkpoint.py"
CLIP_VISION_BUILDER = Path(__file__).resolve().parent / "build_clip_vision.py"

MIN_AVAILABLE_BYTES = 16 * 2**30
# SDXL workflows this test runs when they exist (the SD1.5 variant cannot run on an SDXL checkpoint). Each must
# save its batch with SaveImage, one image per batch item (a SaveImage of core's Image Grid saves one sheet).
EXECUTED_WORKFLOWS = tuple(WORKFLOWS[name].title for name in (
    "spectral_character_sheet_sdxl", "anchor_attention_basic", "compare_settings_sdxl", "character_sheet_long_sdxl"))
CHECKPOINT_NAME = "spectral_anchors_e2e_random_sdxl.safetensors"
SIZE, STEPS, BATCH = 128, 2, 3  # 128 px = a 16x16 latent, the smallest that keeps SDXL's three token grids
RUN_TIMEOUT = 900.0


def executed_workflows() -> list[Path]:
    return [path for path in workflow_paths() if path.stem in EXECUTED_WORKFLOWS]


@pytest.fixture(scope="module")
def sdxl_checkpoint(comfy_server: ComfyServer) -> Iterator[Path]:
    available = psutil.virtual_memory().available
    if available < MIN_AVAILABLE_BYTES:
        pytest.skip(f"the full-size SDXL run needs >= 16 GiB of available memory (build peak ~7.8 GB, server ~13 GB); "
                    f"this machine has {available / 2**30:.1f} GiB available")
    if not DEFAULT_OUTPUT.exists():
        # A subprocess, so the builder's memory is returned before the server loads the checkpoint.
        subprocess.run([sys.executable, str(BUILDER)], check=True, timeout=1500)
    comfy_server.model_file("checkpoints", CHECKPOINT_NAME, target=DEFAULT_OUTPUT)
    yield DEFAULT_OUTPUT
    # Hand the ~13 GB back to the machine for the rest of the suite.
    comfy_server.request("/free", {"unload_models": True, "free_memory": True})


@pytest.fixture(scope="module")
def clip_vision_file(comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight full-size CLIP ViT-L vision file (the smallest layout Load CLIP Vision recognises), built in
    a subprocess so its memory is returned; linked under each name it is asked for by link_clip_vision."""
    path = tmp_path_factory.mktemp("clip-vision") / "random_vit_l.safetensors"
    subprocess.run([sys.executable, str(CLIP_VISION_BUILDER), "--output", str(path)], check=True, timeout=900)
    return path


def link_clip_vision(request: pytest.FixtureRequest, comfy_server: ComfyServer, prompt: dict) -> None:
    """Point every Load CLIP Vision file the prompt names at the random ViT-L (the names stay the workflow's)."""
    names = {node["inputs"]["clip_name"] for node in prompt.values() if node["class_type"] == "CLIPVisionLoader"}
    if names:
        target = request.getfixturevalue("clip_vision_file")
        for name in names:
            comfy_server.model_file("clip_vision", name, target=target)


def check_scores(comfy_server: ComfyServer, prompt: dict, entry: dict, batch: int) -> None:
    """Every score node ran on the real encoder, reported to the canvas, and fed its chart on."""
    for node_id, node in prompt.items():
        if node["class_type"] != "SpectralConsistencyScore":
            continue
        report = entry["outputs"][node_id]["text"][0]
        assert report.startswith("Spectral Consistency Score\nencoder: CLIP ViT-L/14"), report
        assert f"over {batch - node['inputs']['anchors']} target(s)" in report, report
    for node_id, node in prompt.items():
        source = prompt[image_source(prompt, node_id)] if node["class_type"] == "PreviewImage" else {}
        if source.get("class_type") == "ImageStitch":
            records = entry["outputs"][node_id]["images"]
            assert len(records) == 1
            with Image.open(comfy_server.base / records[0]["type"] / records[0]["subfolder"]
                            / records[0]["filename"]) as strip:
                # Three charts of one image per image (at least 560 wide each) and two 32 px bars between them.
                assert strip.size[0] >= 3 * 560 + 2 * 32 and strip.size[1] >= 400, strip.size


def reduce_prompt(prompt: dict) -> int:
    """Point the loader at the random checkpoint and shrink size, steps and batch in place (a story keeps its first
    BATCH scenes); returns the batch size."""
    batch = None
    for node in prompt.values():
        inputs, class_type = node["inputs"], node["class_type"]
        if class_type == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT_NAME
        for name, value in (("width", SIZE), ("height", SIZE), ("steps", STEPS)):
            if isinstance(inputs.get(name), int):
                inputs[name] = value
        if class_type == "EmptyLatentImage":
            inputs["batch_size"] = batch = BATCH
        elif class_type == "SpectralStoryPrompts" and isinstance(inputs.get("scenes"), str):
            # A split story keeps two runs of BATCH images (the second replays the anchors), one batch BATCH scenes.
            split = inputs.get("images_per_batch", 0) > 0
            scenes = [line for line in inputs["scenes"].splitlines() if line.strip()][:BATCH + split]
            inputs["scenes"] = "\n".join(scenes)
            if split:
                inputs["images_per_batch"] = BATCH
            batch = len(scenes)
    assert batch, "cannot tell the workflow's batch size (no EmptyLatentImage or SpectralStoryPrompts scenes)"
    return batch


def image_source(prompt: dict, node_id: str) -> str:
    """The id of the node feeding this node's `images` input."""
    return str(prompt[node_id]["inputs"]["images"][0])


def grid_inputs(prompt: dict, grid_id: str) -> dict:
    """Image Grid's inputs, with a cell size read by Get Image Size from the frames resolved: the frames' size."""
    grid = dict(prompt[grid_id]["inputs"])
    for name in ("cell_width", "cell_height"):
        if isinstance(grid[name], list):
            assert prompt[str(grid[name][0])]["class_type"] == "GetImageSize", f"Image Grid {name} has another source"
            grid[name] = SIZE
    return grid


def expected_saves(prompt: dict, saver_id: str, batch: int) -> tuple[int, tuple[int, int]]:
    """How many images a SaveImage node writes, and their size: the batch at SIZE, or one sheet when it saves the
    output of core's Image Grid (which tiles the batch into cells of its own size)."""
    source_id = image_source(prompt, saver_id)
    source = prompt[source_id]
    if source["class_type"] == "SpectralSheet":  # output 0: every scene once; output 1: one sheet (checked apart)
        return (batch, (SIZE, SIZE)) if prompt[saver_id]["inputs"]["images"][1] == 0 else (1, None)
    if source["class_type"] != "ImageGrid":
        return batch, (SIZE, SIZE)
    grid = grid_inputs(prompt, source_id)
    columns = min(grid["columns"], batch)
    rows = -(-batch // grid["columns"])
    return 1, (columns * grid["cell_width"] + (columns - 1) * grid["padding"],
               rows * grid["cell_height"] + (rows - 1) * grid["padding"])


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("workflow_path", executed_workflows(), ids=lambda path: path.stem)
def test_workflow_runs_on_full_size_sdxl(sdxl_checkpoint: Path, app_page: AppPage, comfy_server: ComfyServer,
                                         workflow_path: Path, request: pytest.FixtureRequest) -> None:
    workflow = json.loads(workflow_path.read_text())
    loaded = app_page.evaluate(LOAD_WORKFLOW_JS, workflow)
    assert all(node["registered"] and not node["has_errors"] for node in loaded["nodes"])
    prompt = graph_to_prompt(app_page)
    output = prompt["output"]
    batch = reduce_prompt(output)
    link_clip_vision(request, comfy_server, output)

    status, answer = comfy_server.queue(output, prompt["workflow"])
    assert status == 200, f"/prompt rejected the prompt: {json.dumps(answer, indent=1)[:4000]}"
    entry = comfy_server.wait_for_history(answer["prompt_id"], RUN_TIMEOUT)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"], \
        f"the run failed: {json.dumps(entry['status'], indent=1)[:4000]}\n{comfy_server.log()[-4000:]}"

    check_scores(comfy_server, output, entry, batch)

    savers = [node_id for node_id, node in output.items() if node["class_type"] == "SaveImage"]
    assert savers, "the workflow saves no image"
    saved = {}
    for node_id in savers:
        images = entry["outputs"][node_id]["images"]
        count, size = expected_saves(output, node_id, batch)
        assert len(images) == count, f"SaveImage {node_id} saved {len(images)} images, expected {count} (batch {batch})"
        saved[node_id] = [comfy_server.base / "output" / record["subfolder"] / record["filename"] for record in images]
        for number, path in enumerate(saved[node_id]):
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / f"run-{workflow_path.stem}-{node_id}-{number}.png").write_bytes(path.read_bytes())
            with Image.open(path) as image:
                assert size is None or image.size == size
                # Random weights give noise, but NaNs anywhere in the pipeline would give a flat black image.
                extrema = image.convert("L").getextrema()
                assert extrema[0] < extrema[1], f"{path.name} is one flat colour {extrema}"

    # A sheet (SaveImage <- Image Grid <- Rebatch Images <- X) holds, cell by cell, the frames another SaveImage
    # saved from the same X: the grid pastes each frame resized with Lanczos into its cell.
    for node_id in savers:
        grid_id = image_source(output, node_id)
        if output[grid_id]["class_type"] != "ImageGrid":
            continue
        rebatch_id = image_source(output, grid_id)
        assert output[rebatch_id]["class_type"] == "RebatchImages", "Image Grid needs a list: feed it Rebatch Images"
        frames = [saved[other] for other in savers if image_source(output, other) == image_source(output, rebatch_id)]
        assert frames, f"no SaveImage saves the frames of sheet {node_id}"
        grid = grid_inputs(output, grid_id)
        with Image.open(saved[node_id][0]) as sheet_image:
            sheet = np.asarray(sheet_image.convert("RGB"), dtype=np.int16)
        for number, frame_path in enumerate(frames[0]):
            left = (number % grid["columns"]) * (grid["cell_width"] + grid["padding"])
            top = (number // grid["columns"]) * (grid["cell_height"] + grid["padding"])
            with Image.open(frame_path) as frame:
                cell = frame.convert("RGB").resize((grid["cell_width"], grid["cell_height"]), Image.LANCZOS)
            found = sheet[top:top + grid["cell_height"], left:left + grid["cell_width"]]
            difference = np.abs(found - np.asarray(cell, dtype=np.int16)).max()
            assert difference <= 1, f"sheet cell {number} differs from frame {number} by up to {difference}"

    # Spectral Sheet: its sheet holds each frame it outputs, at full size, at the padding offset, left to right.
    for node_id in savers:
        sheet_id = image_source(output, node_id)
        if output[sheet_id]["class_type"] != "SpectralSheet" or output[node_id]["inputs"]["images"][1] != 1:
            continue
        frames = [saved[other] for other in savers if output[other]["inputs"]["images"] == [sheet_id, 0]]
        assert frames and len(frames[0]) == batch, "no SaveImage saves the Spectral Sheet's scenes"
        padding = output[sheet_id]["inputs"].get("padding", 8)
        with Image.open(saved[node_id][0]) as sheet_image:
            sheet = np.asarray(sheet_image.convert("RGB"), dtype=np.int16)
        assert sheet.shape[0] > SIZE and sheet.shape[1] > SIZE
        for number, frame_path in enumerate(frames[0][:2]):  # the first row holds at least two cells
            left = padding + number * (SIZE + padding)
            with Image.open(frame_path) as frame:
                cell = np.asarray(frame.convert("RGB"), dtype=np.int16)
            difference = np.abs(sheet[padding:padding + SIZE, left:left + SIZE] - cell).max()
            assert difference <= 2, f"sheet cell {number} differs from frame {number} by up to {difference}"
