"""Recording what the spectrum filters did, for SpectralSpectrumPlot.

A SpectrumRecorder rides on the patched MODEL clone. It records nothing until a plot asks for a layer (the
attention node arms it when it sees a SpectralSpectrumPlot downstream in the prompt; a plot that finds no data
arms it for the next run), so sampling without a plot pays nothing. It keeps only the latest run: the singular
values of each anchor's K and V in the cond chunk, before and after filtering, per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

RECORDER_KEY = "spectral_anchors.spectrum_recorder"


@dataclass
class StepSpectra:
    """One layer at one step: per matrix kind ("K", "V"), singular values before and after, [anchors, r]."""

    before: dict[str, Tensor] = field(default_factory=dict)
    after: dict[str, Tensor] = field(default_factory=dict)


class SpectrumRecorder:
    def __init__(self, layer_keys: list[tuple[str, int, int]]):
        self.layer_keys = list(layer_keys)
        self.armed_layers: set[int] = set()
        self.records: dict[int, dict[int, StepSpectra]] = {}  # layer index -> step -> spectra
        self.filters: dict[str, str] = {}
        self._run = None

    def arm(self, layer_index: int) -> None:
        self.armed_layers.add(layer_index)

    def wants(self, layer_index: int) -> bool:
        return layer_index in self.armed_layers

    def recording_filter(self, spectrum, kind: str, layer_index: int, call, cond_or_uncond: list[int]):
        """A filter that does what `spectrum` does (or nothing) and records the cond chunk's anchor spectra."""
        if call is None or 0 not in cond_or_uncond:
            return spectrum
        if call.run is not self._run:  # a new sampling run replaces the last one's records
            self._run = call.run
            self.records.clear()
        cond_chunk = cond_or_uncond.index(0)
        self.filters[kind] = repr(spectrum) if spectrum is not None else "none"

        def record(x: Tensor) -> Tensor:
            if spectrum is None:
                filtered = x
                before = after = torch.linalg.svdvals(x.float())
            else:
                filtered, before, after = spectrum.filter_with_values(x)
            anchors = x.shape[0] // len(cond_or_uncond)
            rows = slice(cond_chunk * anchors, (cond_chunk + 1) * anchors)
            spectra = self.records.setdefault(layer_index, {}).setdefault(call.step, StepSpectra())
            spectra.before[kind] = before[rows].detach().float().cpu()
            spectra.after[kind] = after[rows].detach().float().cpu()
            return filtered

        return record


def recorder_of(model_patcher) -> SpectrumRecorder | None:
    return model_patcher.get_attachment(RECORDER_KEY)
