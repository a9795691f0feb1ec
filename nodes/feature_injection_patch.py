"""Feature injection's patches: an output-block patch that reads the features of the feature block, and an attn1
output patch that blends each token's matched anchor output into it; with the run's state they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..attention.correspondence import Correspondence, dense_correspondence, smooth_features
from ..attention.grid import token_grid
from ..attention.injection import InjectionIndex, inject_matched_outputs, injection_index
from .anchor_attention_query_blend import recording_queries
from .run_context import call_of, injection_run_of, mask_history_of
from .sampling_run import SamplingRun
from .unet_layout import LayerKey, layer_of_call

if TYPE_CHECKING:
    from .feature_injection import InjectionSettings


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


def state_of(options: dict, settings: InjectionSettings) -> InjectionRun | None:
    # Identity, not equality: when two injection nodes are chained, only the last one's patches act.
    state = injection_run_of(options)
    return state if state is not None and state.settings is settings else None


def _cond_rows(options: dict, rows: int) -> slice | None:
    cond_or_uncond = options.get("cond_or_uncond") or []
    if 0 not in cond_or_uncond or rows % len(cond_or_uncond):
        return None
    per_chunk = rows // len(cond_or_uncond)
    first = cond_or_uncond.index(0) * per_chunk
    return slice(first, first + per_chunk)


def make_feature_patch(settings: InjectionSettings, block_id: int):
    wanted = ("output", block_id)

    def read_features(h, hsp, transformer_options):
        block = transformer_options.get("block")
        state = state_of(transformer_options, settings)
        if state is None or block is None or tuple(block) != wanted or recording_queries(transformer_options):
            return h, hsp
        call = call_of(transformer_options)
        rows = _cond_rows(transformer_options, h.shape[0])
        if call is not None and rows is not None:
            state.observe_features(call, h[rows])
        return h, hsp

    return read_features


def make_injection_patch(settings: InjectionSettings, layers: frozenset[LayerKey]):
    def inject_outputs(n, extra_options):
        state = state_of(extra_options, settings)
        if state is None or state.first_pass or layer_of_call(extra_options) not in layers:
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

    return inject_outputs
