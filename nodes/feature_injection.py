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

The run's state (InjectionRun) lives in the sampling's transformer_options for the duration of the wrapper and is
removed when it returns; nothing stays on the MODEL. The wrapper is installed outside the pack's run tracker
(nodes/sampling_run.py), so each pass gets a fresh SamplingRun (fresh mask history, fresh per-run scratch).
Anchors: when a SpectralAnchorAttention plan is on the sampled model, its anchor count wins (read when sampling
starts, so the two nodes may be applied in either order).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.patcher_extension import WrappersMP
from torch import Tensor

from ..attention.correspondence import Correspondence, dense_correspondence, smooth_features
from ..attention.grid import token_grid
from ..attention.injection import (
    DEFAULT_END,
    DEFAULT_START,
    FEATURE_TIMESTEP,
    InjectionIndex,
    inject_matched_outputs,
    injection_index,
    nearest_step,
)
from ..attention.schedule import SigmaWindow, steps_in_window
from ..attention.sharing import anchor_count_in_chunk
from .query_blend import recording_queries
from .run_context import (
    FEATURE_INJECTION_WRAPPER,
    INJECTION_RUN_KEY,
    PackPatcher,
    call_of,
    holding,
    injection_run_of,
    mask_history_of,
    sampling_options,
)
from .sampling_run import SamplingRun, track_sampling_runs
from .unet_layout import LayerKey, layout_of, unet_of

LAYER_CHOICES = ("finest", "finest_decoder")
SOURCE_CHOICES = ("two-pass", "single-pass")
# Timesteps of discrete models run 0..999: ComfyUI's percent p sits at timestep (1 - p) x 999.
_TIMESTEP_SPAN = 999.0


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


@dataclass
class FeatureCapture:
    """The first pass's harvest: smoothed features [B, C, H, W] of the cond chunk and the subject masks [B, H*W]."""

    step: int
    features: Tensor | None = None
    masks: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.features is not None


@dataclass
class RecentFeatures:
    """Single-pass: the smoothed features of the two latest steps seen (the latest may be the current step's)."""

    latest: tuple[int, Tensor] | None = None
    previous: tuple[int, Tensor] | None = None

    def record(self, step: int, features: Tensor) -> None:
        if self.latest is not None and self.latest[0] != step:
            self.previous = self.latest
        self.latest = (step, features)

    def before(self, step: int) -> Tensor | None:
        for entry in (self.latest, self.previous):
            if entry is not None and entry[0] < step:
                return entry[1]
        return None


@dataclass
class InjectionRun:
    """One sampling run's injection state, in transformer_options while the wrapper runs."""

    settings: InjectionSettings
    anchor_count: int
    window: range
    capture: FeatureCapture | None = None  # set while the first pass runs
    correspondence: Correspondence | None = None
    subject_masks: Tensor | None = None  # the masks the correspondence used (None: mask-free)
    index: InjectionIndex | None = None
    recent: RecentFeatures | None = None
    _cached: dict[int, InjectionIndex | None] = field(default_factory=dict)

    @property
    def first_pass(self) -> bool:
        return self.capture is not None

    def observe_features(self, call, features: Tensor) -> None:
        """Features of the cond chunk at the feature block, from one model call."""
        if self.capture is not None:
            if not self.capture.done and call.step >= self.capture.step:
                grid = tuple(features.shape[-2:])
                self.capture.masks = _subject_masks(call.run, call.step + 1, grid, features.shape[0])
                self.capture.features = smooth_features(features.detach())
        elif self.recent is not None and call.step < self.window.stop - 1:
            self.recent.record(call.step, smooth_features(features.detach()))

    def index_for(self, call, images: int, grid: tuple[int, int]) -> InjectionIndex | None:
        if self.recent is None:
            return self.index
        if call.step not in self._cached:
            self._cached.clear()  # one step's index at a time
            features = self.recent.before(call.step)
            index = None
            if features is not None and features.shape[0] == images and tuple(features.shape[-2:]) == grid:
                masks = _subject_masks(call.run, call.step, grid, images)
                self.subject_masks = masks
                self.correspondence = dense_correspondence(features, self.anchor_count, masks)
                index = injection_index(self.correspondence)
            self._cached[call.step] = index
        return self._cached[call.step]


def _subject_masks(run: SamplingRun | None, step: int, grid: tuple[int, int], images: int) -> Tensor | None:
    """The subject masks SpectralAnchorAttention computes for `step` on `grid`, or None (mask-free)."""
    history = mask_history_of(run)
    if history is None or history.image_count != images:
        return None
    return history.masks(step, grid)


def finest_self_attention_layers(unet: UNetModel, choice: str) -> list[LayerKey]:
    """The self-attention layers a `layers` choice names: the finest grid's, encoder and decoder ("finest") or
    decoder only ("finest_decoder")."""
    if choice not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {choice!r}")
    return layout_of(unet).finest_self_attention_layers(decoder_only=choice == "finest_decoder")


def feature_step(model_sampling, schedule: list[float], target_timestep: float) -> int:
    """The schedule step (of the evaluated sigmas, the last one excluded) whose model timestep is nearest the target.

    The target is given on the 0..999 scale of discrete models and mapped through the model's own sampling (so
    EDM-style models get the sigma ComfyUI's percent of the same place gives).
    """
    evaluated = schedule[:-1] if len(schedule) > 1 else schedule
    target_sigma = model_sampling.percent_to_sigma(1.0 - float(target_timestep) / _TIMESTEP_SPAN)
    target = float(model_sampling.timestep(torch.tensor(float(target_sigma))))
    timesteps = [float(model_sampling.timestep(torch.tensor(float(sigma)))) for sigma in evaluated]
    return nearest_step(timesteps, target)


def injection_steps(model_sampling, schedule: list[float], start_percent: float, end_percent: float) -> range:
    """The steps of this (sub-)schedule inside ComfyUI's percent window: start_sigma >= sigma >= end_sigma.

    Percents of the noise schedule (model_sampling.percent_to_sigma), as ControlNet, Deep Shrink and Spectral
    Anchor Attention use them, so a window stays where it is whatever the scheduler, the step count, or a
    KSamplerAdvanced step split.
    """
    if end_percent <= start_percent:
        return range(0)
    window = SigmaWindow(float(model_sampling.percent_to_sigma(start_percent)),
                         float(model_sampling.percent_to_sigma(end_percent)))
    return steps_in_window(schedule, window)


def _has_sources(images: int, anchor_count: int) -> bool:
    """Whether any image has a source: a second anchor, or a target next to an anchor."""
    anchors = anchor_count_in_chunk(anchor_count, images)
    return anchors >= 2 or (anchors >= 1 and images > anchors)


def _copy_conds(conds: dict) -> dict:
    # The executor replaces (never edits) the conds it processes; a shallow copy restores the second pass's input.
    return {key: [dict(cond) for cond in value] for key, value in conds.items()}


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
    pack.install_wrapper(WrappersMP.OUTER_SAMPLE, FEATURE_INJECTION_WRAPPER, _make_sample_wrapper(settings))
    track_sampling_runs(patched)
    skip_prediction, skip_unet = _make_skip_wrappers(settings)
    pack.install_wrapper(WrappersMP.PREDICT_NOISE, FEATURE_INJECTION_WRAPPER, skip_prediction)
    pack.install_wrapper(WrappersMP.DIFFUSION_MODEL, FEATURE_INJECTION_WRAPPER, skip_unet)
    patched.set_model_output_block_patch(_make_feature_patch(settings, block))
    patched.set_model_attn1_output_patch(_make_injection_patch(settings, layers))
    return patched


def _state_of(options: dict, settings: InjectionSettings) -> InjectionRun | None:
    # Identity, not equality: when two injection nodes are chained, only the last one's patches act.
    state = injection_run_of(options)
    return state if state is not None and state.settings is settings else None


def _make_sample_wrapper(settings: InjectionSettings):
    def sample_with_injection(executor, *args, **kwargs):
        guider = executor.class_obj
        try:
            bound = inspect.signature(guider.outer_sample).bind(*args, **kwargs)
        except TypeError:  # another wrapper changed the call: better no injection than a failed sampling
            logging.warning("SpectralFeatureInjection: unexpected sampler call; sampling without injection.")
            return executor(*args, **kwargs)
        schedule = [float(sigma) for sigma in bound.arguments["sigmas"].flatten().tolist()]
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        window = injection_steps(model_sampling, schedule, settings.start_percent, settings.end_percent)
        plan = PackPatcher(guider.model_patcher).sharing_plan
        anchor_count = plan.anchor_count if plan is not None else settings.anchor_count
        images = bound.arguments["noise"].shape[0]
        if not window or not _has_sources(images, anchor_count):
            return executor(*args, **kwargs)  # nothing would be injected: no first pass either

        state = InjectionRun(settings=settings, anchor_count=anchor_count, window=window)
        with holding(sampling_options(guider), INJECTION_RUN_KEY, state):
            if settings.source == "two-pass":
                state.capture = FeatureCapture(step=feature_step(model_sampling, schedule, settings.feature_timestep))
                _first_pass(executor, guider, bound, state.capture)
                capture, state.capture = state.capture, None
                if capture.done:
                    state.subject_masks = capture.masks
                    state.correspondence = dense_correspondence(capture.features, anchor_count, capture.masks)
                    state.index = injection_index(state.correspondence)
                    capture.features = None  # one feature map per image, held only until here
                else:
                    logging.warning("SpectralFeatureInjection: the first pass never reached the feature step with "
                                    "the positive prompt; sampling without injection.")
            else:
                state.recent = RecentFeatures()
            return executor(*args, **kwargs)

    return sample_with_injection


def _first_pass(executor, guider, bound: inspect.BoundArguments, capture: FeatureCapture) -> None:
    arguments = bound.signature.bind(*bound.args, **bound.kwargs)
    callback = arguments.arguments.get("callback")
    if callback is not None:
        def progress(*args, **kwargs):
            if not capture.done:  # the bar follows the first pass up to the feature step
                return callback(*args, **kwargs)
            return None

        arguments.arguments["callback"] = progress
    conds = _copy_conds(guider.conds)
    try:
        executor(*arguments.args, **arguments.kwargs)  # its result is discarded
    finally:
        guider.conds = conds


def _make_skip_wrappers(settings: InjectionSettings):
    """Once the first pass has its features, its remaining model calls are answered without running anything.

    Whole steps are skipped at PREDICT_NOISE (before ControlNets and the like run): the denoised prediction is the
    input itself, so the sampler's update is a no-op. The rest of the feature step (an uncond forward of its own,
    a second-order sampler's second call) is skipped at DIFFUSION_MODEL with a zero prediction.
    """

    def done(transformer_options: dict) -> bool:
        state = _state_of(transformer_options, settings)
        return state is not None and state.capture is not None and state.capture.done

    def skip_prediction(executor, x, timestep, model_options=None, seed=None):
        if done((model_options or {}).get("transformer_options", {})):
            return x.clone()
        return executor(x, timestep, model_options, seed)

    def skip_unet(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if done(transformer_options):
            return x.new_zeros((x.shape[0], executor.class_obj.out_channels, *x.shape[2:]))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    return skip_prediction, skip_unet


def _cond_rows(options: dict, rows: int) -> slice | None:
    cond_or_uncond = options.get("cond_or_uncond") or []
    if 0 not in cond_or_uncond or rows % len(cond_or_uncond):
        return None
    per_chunk = rows // len(cond_or_uncond)
    first = cond_or_uncond.index(0) * per_chunk
    return slice(first, first + per_chunk)


def _make_feature_patch(settings: InjectionSettings, block_id: int):
    wanted = ("output", block_id)

    def read_features(h, hsp, transformer_options):
        block = transformer_options.get("block")
        state = _state_of(transformer_options, settings)
        if state is None or block is None or tuple(block) != wanted or recording_queries(transformer_options):
            return h, hsp
        call = call_of(transformer_options)
        rows = _cond_rows(transformer_options, h.shape[0])
        if call is not None and rows is not None:
            state.observe_features(call, h[rows])
        return h, hsp

    read_features.feature_block = block_id  # for tests and tools
    return read_features


def _make_injection_patch(settings: InjectionSettings, layers: frozenset[LayerKey]):
    def inject_outputs(n, extra_options):
        state = _state_of(extra_options, settings)
        block = extra_options.get("block")
        if state is None or state.first_pass or block is None:
            return n
        if (block[0], block[1], extra_options.get("block_index", 0)) not in layers:
            return n
        call = call_of(extra_options)
        if call is None or call.step not in state.window or recording_queries(extra_options):
            return n
        rows = _cond_rows(extra_options, n.shape[0])
        if rows is None:
            return n
        shape = extra_options["original_shape"]
        grid = token_grid(shape[-2], shape[-1], n.shape[1])
        images = rows.stop - rows.start
        index = state.index_for(call, images, grid)
        if index is None or index.image_count != images or index.token_count != n.shape[1]:
            return n
        return inject_matched_outputs(n, rows.start, index, settings.strength)

    inject_outputs.layers = layers  # for tests and tools
    return inject_outputs
