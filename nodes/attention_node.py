"""SpectralAnchorAttention: anchor-shared extended self-attention on a MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from .io_types import Spectrum
from .sharing_patch import SharingPlan, apply_sharing
from .unet_layers import LAYER_CHOICES, UnsupportedModelError

# 0.01 keeps the very first step plain (it runs at the model's largest sigma, above this start) while sharing
# from the second step on for any schedule of up to 100 steps, as ConsiStory does.
DEFAULT_START_PERCENT = 0.01
MAX_ANCHORS = 64


class SpectralAnchorAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralAnchorAttention",
            display_name="Spectral Anchor Attention",
            category="spectral_anchors",
            description=(
                "Keeps one subject consistent across a batch: the first images of the batch are anchors, and every "
                "image also attends to the anchors' keys and values in self-attention. Put it between the model "
                "loader and the KSampler and give the sampler one prompt per image."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The UNet model (SDXL, SD1.x, SD2.x) to patch. The input is not modified."),
                io.Int.Input("anchors", default=2, min=1, max=MAX_ANCHORS,
                             tooltip="How many images at the start of the batch are anchors. Every image sees the "
                                     "anchors; anchors never see the other images. 2 is the research default; more "
                                     "anchors than images makes every image an anchor."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default="decoder",
                               tooltip="Which self-attention layers share. decoder (the UNet's output blocks) is "
                                       "ConsiStory's choice; adding the middle or all layers gives more identity "
                                       "and more background leakage."),
                io.Float.Input("start_percent", default=DEFAULT_START_PERCENT, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which sharing starts. 0.01 keeps the first step plain "
                                       "so the layout forms freely; 0.0 shares from the very first step."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which sharing stops. End at or before start turns "
                                       "sharing off (the model is then unchanged)."),
                Spectrum.Input("key_spectrum", optional=True,
                               tooltip="Filter for the anchors' keys as other images see them (SpectralTruncate / "
                                       "SpectralReweight). Keys mostly decide background leakage: keep 1-5 %."),
                Spectrum.Input("value_spectrum", optional=True,
                               tooltip="Filter for the anchors' values as other images see them. Values mostly "
                                       "decide subject similarity: keep 5-10 %, or log_squared reweighting."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; feed it to any sampler.")],
        )

    @classmethod
    def execute(cls, model, anchors: int, layers: str, start_percent: float, end_percent: float,
                key_spectrum=None, value_spectrum=None) -> io.NodeOutput:
        plan = SharingPlan(anchor_count=anchors, layers=layers, start_percent=start_percent, end_percent=end_percent,
                           key_spectrum=key_spectrum, value_spectrum=value_spectrum)
        try:
            return io.NodeOutput(apply_sharing(model, plan))
        except UnsupportedModelError as error:
            raise ValueError(f"Spectral Anchor Attention, input 'model': {error}") from None
