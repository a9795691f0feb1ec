"""SpectralFeatureInjection: ConsiStory's feature injection on a MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.injection import DEFAULT_END, DEFAULT_START, FEATURE_TIMESTEP
from .anchor_attention_node import MAX_ANCHORS
from .feature_injection import LAYER_CHOICES, SOURCE_CHOICES, InjectionSettings, apply_feature_injection
from .search_aliases import search_aliases
from .unet_layout import UnsupportedModelError

NODE_NAME = "Spectral Feature Injection"


def _input_error(input_name: str, message: str) -> ValueError:
    return ValueError(f"{NODE_NAME}, input '{input_name}': {message}")


class SpectralFeatureInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralFeatureInjection",
            display_name=NODE_NAME,
            category="spectral_anchors",
            **search_aliases("feature injection", "dift"),
            description=(
                "Makes the subject's details (patterns, colours, small parts) match across the batch: finds, for "
                "every token of every image, the matching token of an anchor from the UNet's own features, and "
                "blends the anchor's self-attention output into it on the finest grid during the early steps "
                "(ConsiStory's feature injection). Use it with Spectral Anchor Attention, before or after it; the "
                "two-pass mode samples up to ~74 % of the steps a first time to find the matches, then samples "
                "for real (about 1.74x the time)."
            ),
            inputs=[
                io.Model.Input("model",
                               tooltip="The UNet model (SDXL, SD1.x, SD2.x) to patch, usually the output of "
                                       "Spectral Anchor Attention. The input is not modified."),
                io.Float.Input("strength", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the matched anchor output an injected token takes: "
                                       "strength x anchor + (1 - strength) x its own. 0.8 is ConsiStory's value; "
                                       "0 turns injection off (the model is then unchanged)."),
                io.Float.Input("start_percent", default=DEFAULT_START, min=0.0, max=1.0, step=0.001,
                               tooltip="Where injection starts, as ComfyUI's percent of the noise schedule (the "
                                       "same meaning as ControlNet's and Deep Shrink's start_percent: 0 = the "
                                       "largest noise, 1 = the end). A step injects while start_percent <= its "
                                       "percent <= end_percent. 0.1 = ConsiStory's n/10 on the normal and simple "
                                       "schedules; karras reaches a percent later (0.07 is step 3 of 30)."),
                io.Float.Input("end_percent", default=DEFAULT_END, min=0.0, max=1.0, step=0.001,
                               tooltip="Where injection ends, as ComfyUI's percent of the noise schedule "
                                       "(inclusive). 0.333 = ConsiStory's n/3 on the normal and simple schedules; "
                                       "0.3 is step 9 of 30 with karras. The window stays put under "
                                       "KSamplerAdvanced's step split. End at or before start turns injection off."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default="finest",
                               tooltip="Which self-attention layers inject; always those on the finest attention "
                                       "grid (64x64 for SDXL at 1024x1024), where the correspondences live. finest "
                                       "= encoder and decoder (ConsiStory); finest_decoder = decoder only."),
                io.Int.Input("anchors", default=2, min=1, max=MAX_ANCHORS,
                             tooltip="How many images at the start of the batch are anchors, used when this node "
                                     "runs without Spectral Anchor Attention. When Spectral Anchor Attention is "
                                     "on the model, its anchor count wins and this value is ignored. Targets "
                                     "take matches from every anchor; anchors from the other anchors."),
                io.Combo.Input("correspondence", options=list(SOURCE_CHOICES), default="two-pass",
                               tooltip="two-pass (faithful): a first sampling up to the step nearest timestep 261 "
                                       "(~74 % of the way) reads the features the matches come from, then the real "
                                       "sampling runs; ~1.74x the time, the progress bar shows both passes. "
                                       "single-pass: no first pass; each injection step matches with the previous "
                                       "step's features, which are still noisy early on: cheaper (about the cost "
                                       "of one sampling) but coarser matches."),
                io.Float.Input("feature_timestep", default=FEATURE_TIMESTEP, min=0.0, max=999.0, step=1.0,
                               optional=True,
                               tooltip="two-pass only: the model timestep (0..999) whose step provides the "
                                       "features. 261 is ConsiStory's choice; lower means a longer first pass "
                                       "and sharper but more image-specific features."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; feed it to any sampler.")],
        )

    @classmethod
    def execute(cls, model, strength: float, start_percent: float, end_percent: float, layers: str, anchors: int,
                correspondence: str, feature_timestep: float = FEATURE_TIMESTEP) -> io.NodeOutput:
        if not 0.0 <= strength <= 1.0:
            raise _input_error("strength", f"{strength} is outside 0..1. Use 0.8 (ConsiStory) or 0 to turn it off.")
        for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
            if not 0.0 <= value <= 1.0:
                raise _input_error(name, f"{value} is outside 0..1; it is a percent of the noise schedule.")
        if layers not in LAYER_CHOICES:
            raise _input_error("layers", f"'{layers}' is not one of {', '.join(LAYER_CHOICES)}.")
        if correspondence not in SOURCE_CHOICES:
            raise _input_error("correspondence", f"'{correspondence}' is not one of {', '.join(SOURCE_CHOICES)}.")
        if anchors < 1:
            raise _input_error("anchors", f"{anchors} anchors; at least one image must be an anchor.")
        if not 0.0 <= feature_timestep <= 999.0:
            raise _input_error("feature_timestep", f"{feature_timestep} is outside 0..999; 261 is the default.")
        settings = InjectionSettings(strength=float(strength), start_percent=float(start_percent),
                                     end_percent=float(end_percent), layers=layers, anchor_count=int(anchors),
                                     source=correspondence, feature_timestep=float(feature_timestep))
        try:
            return io.NodeOutput(apply_feature_injection(model, settings))
        except UnsupportedModelError as error:
            raise _input_error("model", str(error)) from None
