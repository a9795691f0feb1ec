"""The pack's state on a MODEL clone and in a sampling run: every key, with its accessors, and the wrappers' order.

This is the only module that spells the pack's string keys. Three places hold state:
- attachments on the patched ModelPatcher (what the nodes asked for; copied into every clone of it), read and
  written through PackPatcher;
- transformer_options while one sampling (or one model call) lasts, read with the `*_of(options)` functions and
  written with `holding` (for a sampling, removed when it returns) or `with_entry` (a copy for one call);
- a SamplingRun's scratch (nodes/sampling_run.py): per-run state that starts empty with every run.

Wrappers: every wrapper of the pack goes through PackPatcher.install_wrapper, which keeps the pack's wrappers of
each type in the one order of WRAPPER_ORDER (outermost first), whatever order the nodes were applied in.
Other packs' wrappers keep their place outside the pack's wrappers that are installed after them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from comfy.patcher_extension import WrappersMP

if TYPE_CHECKING:
    from ..attention.masks import SubjectMaskHistory
    from ..attention.spectrum import SolverState
    from .anchor_attention import SharingPlan
    from .anchor_attention_query_blend import QueryBlendPass
    from .feature_injection import InjectionSettings
    from .feature_injection_patch import InjectionRun
    from .reference_anchors import ReferenceRun, ReferenceSettings
    from .sampling_run import ModelCall, SamplingRun
    from .spectrum_plot_recording import SpectrumRecorder
    from .story_runs import ActiveStoryRun

# Attachments on the patched ModelPatcher: what each node asked for.
SHARING_PLAN_KEY = "spectral_anchors.sharing_plan"
SPECTRUM_RECORDER_KEY = "spectral_anchors.spectrum_recorder"
INJECTION_SETTINGS_KEY = "spectral_anchors.feature_injection_settings"
REFERENCE_SETTINGS_KEY = "spectral_anchors.reference_settings"

# transformer_options entries while one sampling lasts (set by OUTER_SAMPLE wrappers, removed when they return).
RUN_KEY = "spectral_anchors.run"
INJECTION_RUN_KEY = "spectral_anchors.feature_injection"
REFERENCE_RUN_KEY = "spectral_anchors.reference_run"
STORY_RUN_KEY = "spectral_anchors.story_run"
# transformer_options entries of one model call (a copy of the options made for that call).
CALL_KEY = "spectral_anchors.call"
QUERY_BLEND_KEY = "spectral_anchors.query_blend"
UNET_KEY = "spectral_anchors.unet"

# SamplingRun.scratch entries.
SOLVER_SCRATCH_KEY = "spectral_anchors.spectrum_solver"  # warm-start bases and convergence flags of the solves
MASKS_SCRATCH_KEY = "spectral_anchors.subject_masks"  # the subject mask history (attention/masks.py)
SPECTRA_SCRATCH_PREFIX = SPECTRUM_RECORDER_KEY  # + ".<recorder id>": one run's recorded spectra per recorder

# A plain string key in a conditioning's dict: every ComfyUI conditioning node copies unknown keys along.
STORY_RUN_TAG_KEY = "spectral_anchors_story_run"

# Wrapper keys, one per feature.
FEATURE_INJECTION_WRAPPER = "spectral_anchors.feature_injection"
STORY_RUNS_WRAPPER = "spectral_anchors.story_runs"
SAME_NOISE_WRAPPER = "spectral_anchors.same_noise"
REFERENCE_WRAPPER = "spectral_anchors.reference_anchors"
SAMPLING_RUN_WRAPPER = "spectral_anchors.sampling_run"
SUBJECT_MASKS_WRAPPER = "spectral_anchors.subject_masks"
QUERY_BLEND_WRAPPER = "spectral_anchors.query_blend"
SPECTRUM_SETTLE_WRAPPER = "spectral_anchors.spectrum_settle"

# The pack's wrappers per type, outermost first.
WRAPPER_ORDER: dict[str, tuple[str, ...]] = {
    WrappersMP.OUTER_SAMPLE: (
        FEATURE_INJECTION_WRAPPER,  # samples twice: everything inside runs once per pass
        STORY_RUNS_WRAPPER,  # checks the sampler's own noise and conds, before same noise replaces the noise
        SAME_NOISE_WRAPPER,  # every row gets the first row's noise
        REFERENCE_WRAPPER,  # prepares the references for this pass
        SAMPLING_RUN_WRAPPER,  # innermost: each pass gets a fresh SamplingRun (fresh masks, solver state, spectra)
    ),
    WrappersMP.PREDICT_NOISE: (
        FEATURE_INJECTION_WRAPPER,  # skips whole steps of a first pass before anything else runs
        REFERENCE_WRAPPER,  # reference rows in and out around everything that predicts
    ),
    WrappersMP.APPLY_MODEL: (
        SAMPLING_RUN_WRAPPER,  # hands every model call its ModelCall (sigma read once)
        SPECTRUM_SETTLE_WRAPPER,  # settles the spectrum solves once per call, redoing the call if one failed
    ),
    WrappersMP.DIFFUSION_MODEL: (
        FEATURE_INJECTION_WRAPPER,  # answers a first pass's calls after its feature step without the UNet
        SUBJECT_MASKS_WRAPPER,  # hands the mask reader the UNet being run
        QUERY_BLEND_WRAPPER,  # the plain forward and the blended one of query blending
    ),
}


class PackPatcher:
    """The pack's view of one ModelPatcher: its attachments and wrappers (in the spirit of AnimateDiff-Evolved's
    ModelPatcherHelper). Every feature reads and writes the pack's state on a MODEL through it."""

    def __init__(self, model_patcher) -> None:
        self.model = model_patcher

    # Attachments ------------------------------------------------------------------------------------------------

    @property
    def sharing_plan(self) -> SharingPlan | None:
        """The plan of Spectral Anchor Attention (or the preset node) on this MODEL."""
        return self.model.get_attachment(SHARING_PLAN_KEY)

    def set_sharing_plan(self, plan: SharingPlan) -> None:
        self.model.set_attachments(SHARING_PLAN_KEY, plan)

    @property
    def spectrum_recorder(self) -> SpectrumRecorder | None:
        return self.model.get_attachment(SPECTRUM_RECORDER_KEY)

    def set_spectrum_recorder(self, recorder: SpectrumRecorder) -> None:
        self.model.set_attachments(SPECTRUM_RECORDER_KEY, recorder)

    @property
    def injection_settings(self) -> InjectionSettings | None:
        return self.model.get_attachment(INJECTION_SETTINGS_KEY)

    def set_injection_settings(self, settings: InjectionSettings) -> None:
        self.model.set_attachments(INJECTION_SETTINGS_KEY, settings)

    @property
    def reference_settings(self) -> ReferenceSettings | None:
        return self.model.get_attachment(REFERENCE_SETTINGS_KEY)

    def set_reference_settings(self, settings: ReferenceSettings) -> None:
        self.model.set_attachments(REFERENCE_SETTINGS_KEY, settings)

    # Wrappers ---------------------------------------------------------------------------------------------------

    def install_wrapper(self, wrapper_type: str, key: str, wrapper: Callable) -> None:
        """Install (or replace) the pack's wrapper `key` of this type, in its place of WRAPPER_ORDER."""
        order = WRAPPER_ORDER[wrapper_type]
        if key not in order:
            raise KeyError(f"{key} is not a wrapper of type {wrapper_type} in WRAPPER_ORDER")
        self.model.remove_wrappers_with_key(wrapper_type, key)
        self.model.add_wrapper_with_key(wrapper_type, key, wrapper)
        installed = {name: list(self.model.get_wrappers(wrapper_type, name)) for name in order}
        for name in order:
            self.model.remove_wrappers_with_key(wrapper_type, name)
        for name in order:
            for installed_wrapper in installed[name]:
                self.model.add_wrapper_with_key(wrapper_type, name, installed_wrapper)


# transformer_options ------------------------------------------------------------------------------------------------

def sampling_options(guider) -> dict:
    """The transformer_options a sampling's guider hands every model call (where per-sampling entries go)."""
    return guider.model_options.setdefault("transformer_options", {})


@contextmanager
def holding(options: dict, key: str, value: Any) -> Iterator[Any]:
    """`options[key] = value` for the duration of the block, removed after it whatever happens."""
    options[key] = value
    try:
        yield value
    finally:
        options.pop(key, None)


def with_entry(options: dict, key: str, value: Any) -> dict:
    """A copy of `options` with one more entry: the call made with it sees the entry, its caller does not."""
    return {**options, key: value}


def run_of(options: dict) -> SamplingRun | None:
    return options.get(RUN_KEY)


def call_of(options: dict) -> ModelCall | None:
    return options.get(CALL_KEY)


def injection_run_of(options: dict) -> InjectionRun | None:
    return options.get(INJECTION_RUN_KEY)


def reference_run_of(options: dict) -> ReferenceRun | None:
    return options.get(REFERENCE_RUN_KEY)


def story_run_of(options: dict) -> ActiveStoryRun | None:
    return options.get(STORY_RUN_KEY)


def query_blend_pass_of(options: dict) -> QueryBlendPass | None:
    return options.get(QUERY_BLEND_KEY)


def unet_of_call(options: dict):
    """The UNet being run in this model call (set by the subject masks' DIFFUSION_MODEL wrapper)."""
    return options.get(UNET_KEY)


# SamplingRun scratch -------------------------------------------------------------------------------------------------

def solver_state_of(run: SamplingRun | None) -> SolverState | None:
    return run.scratch.get(SOLVER_SCRATCH_KEY) if run is not None else None


def mask_history_of(run: SamplingRun | None) -> SubjectMaskHistory | None:
    return run.scratch.get(MASKS_SCRATCH_KEY) if run is not None else None
