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

RUN_KEY = "spectral_anchors.run"
CALL_KEY = "spectral_anchors.call"
_WRAPPER_KEY = "spectral_anchors.sampling_run"


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


def run_of(options: dict) -> SamplingRun | None:
    return options.get(RUN_KEY)


def call_of(options: dict) -> ModelCall | None:
    return options.get(CALL_KEY)


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
    transformer_options = guider.model_options.setdefault("transformer_options", {})
    run = SamplingRun(schedule=[float(s) for s in sigmas.tolist()],
                      model_sampling=guider.model_patcher.get_model_object("model_sampling"),
                      model_patcher=guider.model_patcher)
    transformer_options[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        transformer_options.pop(RUN_KEY, None)
        for finish in run.on_end:
            finish()
        run.on_end.clear()
        run.scratch.clear()


def _apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    transformer_options = dict(transformer_options or {})
    run = run_of(transformer_options)
    sigma = float(t.max())
    step = step_index(sigma, run.schedule) if run is not None else 0
    transformer_options[CALL_KEY] = ModelCall(sigma=sigma, step=step, run=run)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def track_sampling_runs(model_patcher) -> None:
    """Install the two wrappers on a clone (idempotent: every feature of the pack shares them)."""
    for wrapper_type, wrapper in ((WrappersMP.OUTER_SAMPLE, _outer_sample), (WrappersMP.APPLY_MODEL, _apply_model)):
        model_patcher.remove_wrappers_with_key(wrapper_type, _WRAPPER_KEY)
        model_patcher.add_wrapper_with_key(wrapper_type, _WRAPPER_KEY, wrapper)


