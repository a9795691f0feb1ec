"""SpectralAnchorAttention: anchor-shared extended self-attention on a MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from . import io_types
from .anchor_attention import SharingPlan, apply_sharing
from .io_types import Spectrum
from .search_aliases import search_aliases
from .spectrum_plot_node import arm_plots_downstream
from .story_runs import anchors_mismatch
from .unet_layout import LAYER_CHOICES, UnsupportedModelError

# 0.01 keeps the very first step plain (it runs at the model's largest sigma, above this start) while sharing
# from the second step on for any schedule of up to 100 steps, as ConsiStory does.
DEFAULT_START_PERCENT = 0.01
MAX_ANCHORS = 64
NODE_NAME = "Spectral Anchor Attention"
# validate_inputs receives a linked input as None and an unconnected optional input not at all: this default
# tells the two apart.
_NOT_CONNECTED = object()


def _missing_story_message() -> str:
    return (f"{NODE_NAME}, input 'story': subject_masks is on but no story is connected. Connect the story output "
            "of a Spectral Story Prompts node (and feed the sampler its positive conditioning and latent), or turn "
            "subject_masks off.")


class SpectralAnchorAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpectralAnchorAttention",
            display_name="Spectral Anchor Attention (consistent character)",
            category="spectral_anchors",
            **search_aliases("consistent", "shared attention"),
            description=(
                "Keeps one subject consistent across a batch: the first images of the batch are anchors, and every "
                "image also attends to the anchors' keys and values in self-attention. Put it between the model "
                "loader and the KSampler and give the sampler one prompt per image."
            ),
            inputs=[
                io.Model.Input("model",
                               tooltip="The UNet model (SDXL, SD1.x, SD2.x) to patch. The input is not modified."),
                io.Int.Input("anchors", default=2, min=1, max=MAX_ANCHORS,
                             tooltip="How many images at the start of the batch are anchors. Every image sees the "
                                     "anchors; anchors never see the other images. 2 is the research default; more "
                                     "anchors than images makes every image an anchor."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default="decoder",
                               tooltip="Which self-attention layers share. decoder (the UNet's output blocks) is "
                                       "ConsiStory's choice; adding the middle or all layers gives more identity "
                                       "and more background leakage."),
                io.Float.Input("start_percent", default=DEFAULT_START_PERCENT, min=0.0, max=1.0, step=0.001,
                               tooltip="Where sharing starts, as ComfyUI's percent of the noise schedule (the same "
                                       "meaning as ControlNet's and Deep Shrink's start_percent: 0 = the largest "
                                       "noise, 1 = the end). 0.01 keeps the first step plain so the layout forms "
                                       "freely; 0.0 shares from the very first step."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where sharing stops, as ComfyUI's percent of the noise schedule (a step "
                                       "shares while start_percent <= its percent <= end_percent). End at or "
                                       "before start turns sharing off (the model is then unchanged)."),
                Spectrum.Input("key_spectrum", optional=True,
                               tooltip="Filter for the anchors' keys as other images see them (SpectralTruncate / "
                                       "SpectralReweight). Keys mostly decide background leakage: keep 1-5 %."),
                Spectrum.Input("value_spectrum", optional=True,
                               tooltip="Filter for the anchors' values as other images see them. Values mostly "
                                       "decide subject similarity: keep 5-10 %, or log_squared reweighting."),
                io_types.Story.Input("story", optional=True,
                                     tooltip="The story output of Spectral Story Prompts: where the subject word "
                                             "sits in each scene's prompt. Needed only for subject_masks; feed the "
                                             "sampler that node's positive conditioning and latent."),
                io.Boolean.Input("subject_masks", default=False, optional=True,
                                 tooltip="ConsiStory's masked sharing: anchors share only the tokens where the "
                                         "subject is (found from the subject word's cross-attention). Less "
                                         "background leaks between images; strong on people and animals, weaker "
                                         "on unusual objects where the mask misses. Off = the mask-free spectral "
                                         "variant. Needs the story input."),
                io.Float.Input("mask_dropout", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="With subject_masks: the fraction of each anchor's subject tokens left out, "
                                       "redrawn every step. Lower = more identity but less pose variety; higher = "
                                       "more variety, weaker identity. 0.5 is ConsiStory's default."),
                io.Int.Input("mask_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                             tooltip="Seed of the mask dropout: the same seed gives the same images, another seed "
                                     "drops other tokens."),
                io.Boolean.Input("query_blending", default=False, optional=True,
                                 tooltip="ConsiStory's 'share queries': during the first tenth of the steps, mix the "
                                         "queries of a plain forward into the shared layers (weight 0.9 falling to "
                                         "0.82). Gives back layout and pose variety that sharing takes away, at a "
                                         "little identity; costs one extra model forward on those steps (steps "
                                         "1..n/10-1 with the default start, so nothing below 20 steps)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; feed it to any sampler.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to find Spectral Spectrum Plot nodes downstream
        )

    @classmethod
    def validate_inputs(cls, subject_masks: bool | None = None, story=_NOT_CONNECTED) -> bool | str:
        # Queue time: only what is known before anything runs. A linked subject_masks is checked by execute.
        if subject_masks is True and story is _NOT_CONNECTED:
            return _missing_story_message()
        return True

    @classmethod
    def execute(cls, model, anchors: int, layers: str, start_percent: float, end_percent: float,
                key_spectrum=None, value_spectrum=None, story=None, subject_masks: bool = False,
                mask_dropout: float = 0.5, mask_seed: int = 0, query_blending: bool = False) -> io.NodeOutput:
        if subject_masks:
            if story is None:
                raise ValueError(_missing_story_message())
            story.require_subject_in_every_scene()
        if story is not None and story.is_split and story.anchor_count != anchors:
            raise anchors_mismatch(anchors, story.anchor_count)
        plan = SharingPlan(anchor_count=anchors, layers=layers, start_percent=start_percent, end_percent=end_percent,
                           key_spectrum=key_spectrum, value_spectrum=value_spectrum, subject_masks=bool(subject_masks),
                           mask_dropout=float(mask_dropout), mask_seed=int(mask_seed), story=story,
                           query_blend=bool(query_blending))
        try:
            patched = apply_sharing(model, plan)
        except UnsupportedModelError as error:
            raise ValueError(f"Spectral Anchor Attention, input 'model': {error}") from None
        arm_plots_downstream(patched, cls.hidden)
        return io.NodeOutput(patched)
