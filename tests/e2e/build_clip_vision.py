"""Build a full-size CLIP ViT-L/14 vision model with random weights, with ComfyUI's own classes, for end-to-end runs.

Load CLIP Vision (comfy.clip_vision.load) recognises an encoder only by its weights' layout (the layer count and
widths of ViT-L/H/bigG, SigLIP, DINOv2), so a small test model cannot go through it: a workflow with Load CLIP
Vision needs a file of the real layout. ViT-L/14 is the smallest it accepts: 303 M parameters, a 0.6 GB fp16 file,
about 1.5 GB of memory while building, some seconds. Its embeddings are meaningless; every node runs for real.

    .venv/bin/python tests/e2e/build_clip_vision.py --output PATH   # prints the file's path
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
SEED = 20241201


def build(output: Path) -> Path:
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    from comfy_harness import boot_comfy, init_weights

    root = boot_comfy()
    import comfy.clip_vision
    import safetensors.torch
    import torch

    clip_vision = comfy.clip_vision.ClipVisionModel(str(root / "comfy" / "clip_vision_config_vitl.json"))
    init_weights(clip_vision.model, SEED)  # ComfyUI's layers allocate without initialising
    state = {key: value.detach().to(torch.float16).contiguous() for key, value in clip_vision.get_sd().items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + f".partial-{os.getpid()}")
    try:
        note = "random-weight CLIP ViT-L vision for tests; not a model"
        safetensors.torch.save_file(state, str(partial), metadata={"spectral_anchors": note})
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    print(build(parser.parse_args().output))


if __name__ == "__main__":
    main()
