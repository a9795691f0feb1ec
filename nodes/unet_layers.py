"""Which self-attention layers a UNet has, and which of them a `layers` setting names."""

from __future__ import annotations

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

# Layer keys are ComfyUI's attn1 replacement keys: (block name, block id, index inside its SpatialTransformer).
LayerKey = tuple[str, int, int]

LAYER_CHOICES = ("decoder", "decoder+middle", "all")
_BLOCKS_OF_CHOICE = {
    "decoder": ("output",),
    "decoder+middle": ("middle", "output"),
    "all": ("input", "middle", "output"),
}

SUPPORTED_FAMILIES = "UNet models with self-attention: SDXL, SD1.x, SD2.x and their fine-tunes"


class UnsupportedModelError(ValueError):
    pass


def unet_of(model_patcher) -> UNetModel:
    """The model's UNet, or a clear error for architectures without UNet self-attention (DiTs)."""
    diffusion_model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, UNetModel):
        kind = type(diffusion_model).__name__ if diffusion_model is not None else type(model_patcher).__name__
        raise UnsupportedModelError(
            f"this MODEL is a {kind}, which has no UNet self-attention layers. Supported: {SUPPORTED_FAMILIES}. "
            "Transformer models such as Flux, SD3 or HiDiT are not supported."
        )
    return diffusion_model


def self_attention_layers(unet: UNetModel) -> list[LayerKey]:
    """Every self-attention layer of the UNet, in forward order."""
    middle = [unet.middle_block] if unet.middle_block is not None else []
    stages = [("input", list(unet.input_blocks)), ("middle", middle), ("output", list(unet.output_blocks))]
    keys: list[LayerKey] = []
    for block_name, blocks in stages:
        for block_id, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    keys.extend((block_name, block_id, index) for index in range(len(layer.transformer_blocks)))
    return keys


def selected_layers(unet: UNetModel, choice: str) -> list[LayerKey]:
    if choice not in _BLOCKS_OF_CHOICE:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {choice!r}")
    wanted = _BLOCKS_OF_CHOICE[choice]
    return [key for key in self_attention_layers(unet) if key[0] in wanted]
