"""bench/score_sheets.py end to end: a folder of saved sheets, a tiny CLIP vision safetensors file (ComfyUI's own
ClipVisionModel with seeded random weights), the script run as users run it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from clip_vision_harness import save_tiny_clip_vision
from comfy_harness import PACK_ROOT
from PIL import Image

SCRIPT = PACK_ROOT / "bench" / "score_sheets.py"


def save(path, seed: int, size=(40, 48)) -> None:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(np.kron(pixels, np.ones((8, 8, 1), dtype=np.uint8))).save(path)


@pytest.mark.timeout(300)
def test_scores_each_sheet_and_prints_a_table(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    weights, config = save_tiny_clip_vision(tmp_path / "model")
    sheets = tmp_path / "sheets"
    for name, seeds in (("same", [1, 1, 1, 1]), ("mixed", [1, 1, 1, 2]), ("short", [3, 3])):
        (sheets / name).mkdir(parents=True)
        # Natural order: frame_2 comes before frame_10, so the anchors are frames 1 and 2.
        for number, seed in zip((1, 2, 10, 11), seeds, strict=False):
            save(sheets / name / f"frame_{number}.png", seed)
    result = subprocess.run([sys.executable, str(SCRIPT), str(sheets), "--clip-vision", str(weights), "--config",
                             str(config), "--anchors", "2", "--cpu"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "== sheet same: 4 images, 2 anchors" in out
    assert "image   3 = frame_10.png" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-3:]}
    assert float(rows["same"][2]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows["mixed"][2]) < 0.999
    assert float(rows["mixed"][2]) > 0.0
    assert rows["short"][2] == "skipped"  # two frames, two anchors: the node's own error is printed
    assert "input 'images': 2 image(s) but anchors is 2" in out


def test_refuses_files_that_are_not_safetensors(tmp_path) -> None:
    (tmp_path / "sheet").mkdir()
    save(tmp_path / "sheet" / "a.png", 1)
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"not read")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sheet"), "--clip-vision", str(model),
                             "--cpu"], capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and "only .safetensors files are read" in result.stderr
