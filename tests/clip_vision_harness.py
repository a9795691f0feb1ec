"""A real comfy.clip_vision.ClipVisionModel with tiny sizes and seeded random weights, for the score tests.

The config is in the format of ComfyUI's comfy/clip_vision_config_vitl.json (CLIP ViT) with small sizes; the
model is ComfyUI's own class built from it, so encode_image runs ComfyUI's real preprocessing and encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from comfy_harness import init_weights

TINY_VISION = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 64,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 16, "projection_dim": 32, "torch_dtype": "float32",
}


def write_config(folder: Path, **overrides: object) -> Path:
    path = Path(folder) / "tiny_clip_vision.json"
    path.write_text(json.dumps({**TINY_VISION, **overrides}))
    return path


def tiny_clip_vision(folder: Path, seed: int = 0, **overrides: object):
    """comfy.clip_vision.ClipVisionModel(config) with its .model weights initialised (ComfyUI's layers skip it)."""
    import comfy.clip_vision

    clip_vision = comfy.clip_vision.ClipVisionModel(str(write_config(folder, **overrides)))
    init_weights(clip_vision.model, seed)
    return clip_vision


def save_tiny_clip_vision(folder: Path, seed: int = 0, **overrides: object) -> tuple[Path, Path]:
    """(weights .safetensors, config .json) of a tiny model, as the bench script's --config takes them."""
    import safetensors.torch

    folder = Path(folder)
    clip_vision = tiny_clip_vision(folder, seed, **overrides)
    weights = folder / "tiny_clip_vision.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in clip_vision.get_sd().items()}, str(weights))
    return weights, folder / "tiny_clip_vision.json"
