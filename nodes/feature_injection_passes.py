"""Feature injection's orchestration around the sampler: the two passes (or the one), and the wrappers that let a
first pass end cheaply once it has its features (see nodes/feature_injection.py for the whole story)."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING

import torch

from ..attention.correspondence import dense_correspondence
from ..attention.injection import injection_index, nearest_step
from ..attention.schedule import SigmaWindow, steps_in_window
from ..attention.sharing import anchor_count_in_chunk
from .feature_injection_patch import FeatureCapture, InjectionRun, RecentFeatures, state_of
from .run_context import INJECTION_RUN_KEY, PackPatcher, holding, sampling_options

if TYPE_CHECKING:
    from .feature_injection import InjectionSettings

# Timesteps of discrete models run 0..999: ComfyUI's percent p sits at timestep (1 - p) x 999.
_TIMESTEP_SPAN = 999.0


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


def make_sample_wrapper(settings: InjectionSettings):
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


def make_skip_wrappers(settings: InjectionSettings):
    """Once the first pass has its features, its remaining model calls are answered without running anything.

    Whole steps are skipped at PREDICT_NOISE (before ControlNets and the like run): the denoised prediction is the
    input itself, so the sampler's update is a no-op. The rest of the feature step (an uncond forward of its own,
    a second-order sampler's second call) is skipped at DIFFUSION_MODEL with a zero prediction.
    """

    def done(transformer_options: dict) -> bool:
        state = state_of(transformer_options, settings)
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
