"""Per-run state for the pack's patches, living only while one sampling run lasts.

An OUTER_SAMPLE wrapper on the patched MODEL clone creates a SamplingRun when sampling starts and drops it when
sampling ends, so nothing outlives the run and nothing is shared between runs. An APPLY_MODEL wrapper reads the
sigma of each model call once (one host sync per call, not one per layer) and hands the patches a ModelCall.
Both reach the attention patches through transformer_options, the channel ComfyUI itself uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from comfy.patcher_extension import WrappersMP

from ..attention.schedule import step_index
from .run_context import (
    CALL_KEY,
    RUN_KEY,
    SAMPLING_RUN_WRAPPER,
    PackPatcher,
    holding,
    run_of,
    sampling_options,
    with_entry,
)


@dataclass
class SamplingRun:
    """What one sampling run knows: its sigma schedule, the model being sampled, and per-feature scratch space."""

    schedule: list[float]
    model_sampling: Any
    scratch: dict[str, Any] = field(default_factory=dict)
    model_patcher: Any = None  # the MODEL clone the sampler was given
    on_end: list[Callable[[], None]] = field(default_factory=list)  # called once when sampling ends

    @property
    def step_count(self) -> int:
        return max(len(self.schedule) - 1, 1)


@dataclass(frozen=True)
class ModelCall:
    """One evaluation of the diffusion model: its sigma and the sampling step it belongs to."""

    sigma: float
    step: int
    run: SamplingRun | None


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
    run = SamplingRun(schedule=[float(s) for s in sigmas.tolist()],
                      model_sampling=guider.model_patcher.get_model_object("model_sampling"),
                      model_patcher=guider.model_patcher)
    try:
        with holding(sampling_options(guider), RUN_KEY, run):
            return executor(*args, **kwargs)
    finally:
        for finish in run.on_end:
            finish()
        run.on_end.clear()
        run.scratch.clear()


def _apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    transformer_options = transformer_options or {}
    run = run_of(transformer_options)
    sigma = float(t.max())
    step = step_index(sigma, run.schedule) if run is not None else 0
    transformer_options = with_entry(transformer_options, CALL_KEY, ModelCall(sigma=sigma, step=step, run=run))
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def fresh_control(control):
    """A copy of the control residuals whose lists one UNet forward may pop without emptying the caller's.

    The UNet pops ControlNet and T2I-Adapter residuals off these lists as it applies them: a wrapper that runs the
    UNet more than once per call hands each run its own lists.
    """
    if not isinstance(control, dict):
        return control
    return {name: list(residuals) if isinstance(residuals, list) else residuals
            for name, residuals in control.items()}


def track_sampling_runs(model_patcher) -> None:
    """Install the two wrappers on a clone (idempotent: every feature of the pack shares them)."""
    pack = PackPatcher(model_patcher)
    pack.install_wrapper(WrappersMP.OUTER_SAMPLE, SAMPLING_RUN_WRAPPER, _outer_sample)
    pack.install_wrapper(WrappersMP.APPLY_MODEL, SAMPLING_RUN_WRAPPER, _apply_model)


