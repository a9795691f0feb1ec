"""SpectralConsistencyPreset: consistent-character sharing from one plain-language choice."""

from __future__ import annotations

from comfy_api.latest import io

from .anchor_attention import SharingPlan, apply_sharing
from .anchor_attention_node import MAX_ANCHORS
from .io_types import Spectrum
from .preset import CUSTOM, DEFAULT_PRESET, PRESET_NAMES, PRESETS, build_chain
from .preset_same_noise import install_same_noise
from .search_aliases import search_aliases
from .spectrum_plot_node import arm_plots_downstream
from .unet_layout import UnsupportedModelError

NODE_ID = "SpectralConsistencyPreset"
NODE_NAME = "Consistent Character (Spectral Anchors preset)"

_PRESET_TOOLTIP = (
    "How to keep the character consistent. recommended: the research's best balance of a consistent character and "
    "clean backgrounds (start here). stronger identity: every image also starts from the same noise, so the "
    "character looks more alike, in similar poses. more variety: more different layouts and poses, a little less "
    "alike. less background leakage: the anchors' backgrounds show up less in the other scenes. custom: your own "
    "spectra on key_spectrum / value_spectrum (Spectral Truncate / Spectral Reweight). The help page lists the exact "
    "settings of each."
)


class SpectralConsistencyPreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=NODE_NAME,
            category="spectral_anchors",
            **search_aliases("consistent", "preset", "identity"),
            description=(
                "Keeps one character consistent across a batch of scene prompts, from one choice in plain words. Put "
                "it between the model loader and the KSampler, and give the sampler one prompt per image (Spectral "
                "Story Prompts does that): the first images are the anchors the others take the character from. "
                "Each preset stands for settings of Spectral Anchor Attention and the spectrum nodes, listed in the "
                "help page; use those nodes directly for every research knob."
            ),
            inputs=[
                io.Model.Input("model",
                               tooltip="The UNet model (SDXL, SD1.x, SD2.x) to patch. The input is not modified."),
                io.Combo.Input("preset", options=list(PRESET_NAMES), default=DEFAULT_PRESET, tooltip=_PRESET_TOOLTIP),
                io.Int.Input("anchors", default=2, min=1, max=MAX_ANCHORS,
                             tooltip="How many images at the start of the batch are anchors: the character is "
                                     "taken from them. 2 is the research default; give the first scenes clear, "
                                     "simple views of the character."),
                Spectrum.Input("key_spectrum", optional=True,
                               tooltip="Only with preset custom: the filter for the anchors' keys (Spectral "
                                       "Truncate / Spectral Reweight). Keys mostly decide background leakage."),
                Spectrum.Input("value_spectrum", optional=True,
                               tooltip="Only with preset custom: the filter for the anchors' values. Values mostly "
                                       "decide how alike the character looks."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; feed it to any sampler.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to find Spectral Spectrum Plot nodes downstream
        )

    @classmethod
    def execute(cls, model, preset: str, anchors: int, key_spectrum=None, value_spectrum=None) -> io.NodeOutput:
        if preset not in PRESETS:
            raise ValueError(f"{NODE_NAME}, input 'preset': unknown preset {preset!r}; choose one of "
                             f"{', '.join(PRESET_NAMES)}.")
        settings = PRESETS[preset]
        if preset == CUSTOM:
            keys, values = key_spectrum, value_spectrum
        else:
            connected = [name for name, value in (("key_spectrum", key_spectrum), ("value_spectrum", value_spectrum))
                         if value is not None]
            if connected:
                raise ValueError(f"{NODE_NAME}, input '{connected[0]}': a spectrum is connected, but preset "
                                 f"'{preset}' sets its own spectra. Choose preset custom to use your spectra, or "
                                 "disconnect them.")
            keys, values = build_chain(settings.key_chain), build_chain(settings.value_chain)
        plan = SharingPlan(anchor_count=anchors, layers=settings.layers, start_percent=settings.start_percent,
                           end_percent=settings.end_percent, key_spectrum=keys, value_spectrum=values,
                           subject_masks=settings.subject_masks, query_blend=settings.query_blending)
        try:
            patched = apply_sharing(model, plan)
        except UnsupportedModelError as error:
            raise ValueError(f"{NODE_NAME}, input 'model': {error}") from None
        if settings.same_noise:
            install_same_noise(patched)
        arm_plots_downstream(patched, cls.hidden)
        return io.NodeOutput(patched)
