"""Feature injection on a MODEL clone: an OUTER_SAMPLE wrapper for the two passes, one output-block patch that
reads the features, one attn1 output patch that blends.

Two-pass (ConsiStory): the wrapper calls the sampler executor twice with the same arguments.
1. The first pass is the same sampling (same noise, schedule, sampler and every other patch on the model) until
   the feature step, the schedule step whose model timestep is nearest 261 of 1000. At the first cond-chunk model
   call of that step, an output_block_patch takes the DIFT features (the input of the first decoder block on the
   finest self-attention grid, i.e. the output of the decoder stage that feeds that grid, upsampling included),
   smooths them (3x3 Gaussian, sigma 1) and reads the subject masks, if SpectralAnchorAttention computes them.
   From then on the pass's remaining model calls are answered without running the UNet (PREDICT_NOISE and
   DIFFUSION_MODEL wrappers) and progress callbacks stop: the sampler only does its cheap arithmetic to the end,
   and the pass's result is thrown away. (The schedule is not cut short: a shorter schedule changes the Brownian
   noise of the SDE samplers and the step count other features read, so the first pass would no longer be the
   same sampling.)
2. The correspondences are computed once, from one feature map per image; the features are then dropped.
3. The second pass is the real sampling, with injection in the window's steps.
The progress bar therefore runs to the feature step, then from zero to the end.

Single-pass: one sampling; at each window step the correspondences come from the features of the latest earlier
model call (the step before), recomputed once per step, with the masks of that moment. No second pass, but the
features are those of the noisy early steps, so the matches are coarser.

Subject masks: when SpectralAnchorAttention computes them (its subject_masks input), the first pass takes its
masks at the feature step (the cross-attention of up to 20 steps up to and including it), on the finest grid; the
single-pass mode takes the masks of the current step. Otherwise the correspondence is mask-free (see
attention/correspondence.py for what is injected then).

Where the code is: this module holds what the node asks for and how a clone gets it;
nodes/feature_injection_passes.py the two-pass (and single-pass) orchestration around the sampler, and
nodes/feature_injection_patch.py the patches that read the features and blend the matched outputs, with the run's
state (InjectionRun) they share.

The run's state (InjectionRun) lives in the sampling's transformer_options for the duration of the wrapper and is
removed when it returns; nothing stays on the MODEL. The wrapper is installed outside the pack's run tracker
(nodes/sampling_run.py), so each pass gets a fresh SamplingRun (fresh mask history, fresh per-run scratch).
Anchors: when a SpectralAnchorAttention plan is on the sampled model, its anchor count wins (read when sampling
starts, so the two nodes may be applied in either order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.patcher_extension import WrappersMP

from ..attention.injection import DEFAULT_END, DEFAULT_START, FEATURE_TIMESTEP
from .feature_injection_passes import make_sample_wrapper, make_skip_wrappers
from .feature_injection_patch import make_feature_patch, make_injection_patch
from .run_context import FEATURE_INJECTION_WRAPPER, PackPatcher
from .sampling_run import track_sampling_runs
from .unet_layout import LayerKey, layout_of, unet_of

LAYER_CHOICES = ("finest", "finest_decoder")
SOURCE_CHOICES = ("two-pass", "single-pass")


@dataclass(frozen=True)
class InjectionSettings:
    """What the SpectralFeatureInjection node asked for."""

    strength: float = 0.8
    start_percent: float = DEFAULT_START
    end_percent: float = DEFAULT_END
    layers: str = "finest"
    anchor_count: int = 2
    source: str = "two-pass"
    feature_timestep: float = FEATURE_TIMESTEP

    @property
    def is_off(self) -> bool:
        return self.strength == 0.0 or self.end_percent <= self.start_percent


def finest_self_attention_layers(unet: UNetModel, choice: str) -> list[LayerKey]:
    """The self-attention layers a `layers` choice names: the finest grid's, encoder and decoder ("finest") or
    decoder only ("finest_decoder")."""
    if choice not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {choice!r}")
    return layout_of(unet).finest_self_attention_layers(decoder_only=choice == "finest_decoder")


def apply_feature_injection(model_patcher, settings: InjectionSettings):
    """A clone of `model_patcher` that injects matched attention outputs per `settings`."""
    if settings.layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {settings.layers!r}")
    if settings.source not in SOURCE_CHOICES:
        raise ValueError(f"correspondence must be one of {', '.join(SOURCE_CHOICES)}, not {settings.source!r}")
    unet = unet_of(model_patcher)
    patched = model_patcher.clone()
    if settings.is_off:
        return patched  # nothing to do: the clone computes exactly what the input does
    layers = frozenset(finest_self_attention_layers(unet, settings.layers))
    block = layout_of(unet).feature_block
    if not layers or block is None:
        logging.warning("SpectralFeatureInjection: this UNet has no self-attention layers; nothing to inject.")
        return patched
    pack = PackPatcher(patched)
    pack.set_injection_settings(settings)
    # The run tracker sits inside this wrapper (run_context.WRAPPER_ORDER): every pass gets its own SamplingRun.
    pack.install_wrapper(WrappersMP.OUTER_SAMPLE, FEATURE_INJECTION_WRAPPER, make_sample_wrapper(settings))
    track_sampling_runs(patched)
    skip_prediction, skip_unet = make_skip_wrappers(settings)
    pack.install_wrapper(WrappersMP.PREDICT_NOISE, FEATURE_INJECTION_WRAPPER, skip_prediction)
    pack.install_wrapper(WrappersMP.DIFFUSION_MODEL, FEATURE_INJECTION_WRAPPER, skip_unet)
    patched.set_model_output_block_patch(make_feature_patch(settings, block))
    patched.set_model_attn1_output_patch(make_injection_patch(settings, layers))
    return patched
