"""The UNet's layout, the one place that walks it: its self-attention layers, their resolution levels, the coarsest
cross-attention, the finest self-attention, the feature block and the token grid of every layer.

Every feature asks this module instead of walking input_blocks / middle_block / output_blocks itself. Levels come
from the UNet's structure, never from token counts: each Downsample (or downsampling ResBlock) in the encoder takes
the following blocks one level down, each Upsample (or upsampling ResBlock) in the decoder one level back up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample

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


def _resamples(layer, kind: type) -> bool:
    return isinstance(layer, kind) or (isinstance(layer, ResBlock) and isinstance(getattr(layer, "h_upd", None), kind))


@dataclass(frozen=True)
class UNetLayout:
    """What the pack needs to know of one UNet's structure, read once by `layout_of`.

    Levels count resolution halvings from the latent grid (0); dict orders are the UNet's forward order.
    """

    layer_levels: dict[LayerKey, int]  # every self-attention layer -> its level
    cross_attention_levels: dict[LayerKey, int]  # every transformer block with cross-attention -> its level
    output_levels: dict[int, int]  # every output block -> the level of its input
    encoder_downsamples: int  # how many resampling steps the encoder takes

    @property
    def self_attention_layers(self) -> list[LayerKey]:
        """Every self-attention layer of the UNet, in forward order."""
        return list(self.layer_levels)

    def selected_layers(self, choice: str) -> list[LayerKey]:
        """The self-attention layers a `layers` setting of Spectral Anchor Attention names."""
        if choice not in _BLOCKS_OF_CHOICE:
            raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {choice!r}")
        wanted = _BLOCKS_OF_CHOICE[choice]
        return [key for key in self.layer_levels if key[0] in wanted]

    def finest_self_attention_layers(self, decoder_only: bool = False) -> list[LayerKey]:
        """The self-attention layers on the finest attention grid: encoder and decoder, or the decoder only."""
        if not self.layer_levels:
            return []
        finest = min(self.layer_levels.values())
        blocks = ("output",) if decoder_only else ("input", "middle", "output")
        return [key for key, level in self.layer_levels.items() if level == finest and key[0] in blocks]

    @property
    def feature_block(self) -> int | None:
        """The output block whose input is the DIFT feature map: the first decoder block on the finest attention
        grid (its input is the output of the decoder stage that feeds that grid, upsampling included)."""
        if not self.layer_levels:
            return None
        finest = min(self.layer_levels.values())
        return min((block_id for block_id, level in self.output_levels.items() if level == finest), default=None)

    @property
    def coarsest_cross_attention_layers(self) -> frozenset[LayerKey]:
        """The cross-attention layers on the coarsest attention grid (SDXL: the 32x32 grid at 1024x1024)."""
        if not self.cross_attention_levels:
            return frozenset()
        deepest = max(self.cross_attention_levels.values())
        return frozenset(key for key, level in self.cross_attention_levels.items() if level == deepest)

    def level_of(self, layer: LayerKey) -> int:
        """The resolution level a layer's block works on (an output block upsamples after its attention)."""
        block, block_id, index = layer
        if (block, block_id, index) in self.layer_levels:
            return self.layer_levels[(block, block_id, index)]
        if block == "output":
            return self.output_levels[block_id]
        if block == "middle":
            return self.encoder_downsamples
        raise KeyError(f"no self-attention layer {layer}")

    def token_grid(self, layer: LayerKey, latent_height: int, latent_width: int) -> tuple[int, int]:
        """The token grid (height, width) a self-attention layer works on for a latent of this size: the latent
        halved (rounding up, as the UNet's stride-2 convolutions do) once per resolution level above the layer."""
        height, width = latent_height, latent_width
        for _ in range(self.level_of(layer)):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height, width


def layout_of(unet: UNetModel) -> UNetLayout:
    """Walk the UNet once: the levels of its self-attention layers, cross-attention layers and output blocks."""
    layer_levels: dict[LayerKey, int] = {}
    cross_levels: dict[LayerKey, int] = {}
    output_levels: dict[int, int] = {}

    def visit(block_name: str, block_id: int, block, level: int) -> None:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                for index, transformer in enumerate(layer.transformer_blocks):
                    layer_levels[(block_name, block_id, index)] = level
                    if getattr(transformer, "attn2", None) is not None:
                        cross_levels[(block_name, block_id, index)] = level

    level = 0
    for block_id, block in enumerate(unet.input_blocks):
        visit("input", block_id, block, level)
        if any(_resamples(layer, Downsample) for layer in block):
            level += 1
    downsamples = level
    if unet.middle_block is not None:
        visit("middle", 0, unet.middle_block, level)
    for block_id, block in enumerate(unet.output_blocks):
        output_levels[block_id] = level
        visit("output", block_id, block, level)
        if any(_resamples(layer, Upsample) for layer in block):
            level -= 1
    return UNetLayout(layer_levels=layer_levels, cross_attention_levels=cross_levels, output_levels=output_levels,
                      encoder_downsamples=downsamples)


def self_attention_layers(unet: UNetModel) -> list[LayerKey]:
    """Every self-attention layer of the UNet, in forward order."""
    return layout_of(unet).self_attention_layers


def selected_layers(unet: UNetModel, choice: str) -> list[LayerKey]:
    return layout_of(unet).selected_layers(choice)


def feature_block(unet: UNetModel) -> int | None:
    """The output block whose input is the DIFT feature map (UNetLayout.feature_block)."""
    return layout_of(unet).feature_block


def coarsest_cross_attention_layers(unet: UNetModel) -> frozenset[LayerKey]:
    """The cross-attention layers on the coarsest attention grid (UNetLayout.coarsest_cross_attention_layers)."""
    return layout_of(unet).coarsest_cross_attention_layers


def layer_token_grid(unet: UNetModel, layer: LayerKey, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The token grid (height, width) a self-attention layer works on for a latent of this size."""
    return layout_of(unet).token_grid(layer, latent_height, latent_width)


def layer_of_call(extra_options: dict) -> LayerKey | None:
    """The layer an attention patch is called for, from the block and index ComfyUI hands it (None outside a
    SpatialTransformer)."""
    block = extra_options.get("block")
    if block is None:
        return None
    return (block[0], block[1], extra_options.get("block_index", 0))


def blocks_of(layers: list[LayerKey]) -> list[tuple[str, int]]:
    """The UNet blocks (block name, block id) that hold these layers, in the layers' order: the 2-part keys of
    ComfyUI's attn1 replacements, one per block (which block a sharing patch serves)."""
    return list(dict.fromkeys(key[:2] for key in layers))


def cross_attention_module(unet: UNetModel, layer: LayerKey):
    """The CrossAttention module (attn2) of one transformer block, by ComfyUI's (block, id, index) key."""
    block_name, block_id, index = layer
    if block_name == "input":
        block = unet.input_blocks[block_id]
    elif block_name == "middle":
        block = unet.middle_block
    else:
        block = unet.output_blocks[block_id]
    transformer = next(module for module in block if isinstance(module, SpatialTransformer))
    return transformer.transformer_blocks[index].attn2
