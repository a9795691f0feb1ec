"""Recording what the spectrum filters did, for SpectralSpectrumPlot.

A SpectrumRecorder rides on the patched MODEL clone (every clone made from it shares it). What it records:
- For a filtered matrix kind (K or V with a key_spectrum / value_spectrum), always: the filter decomposes the
  anchors' matrices anyway, and its singular values before and after are kept (on the layers no plot asked for,
  the fast path's values: all of them from the full decomposition, the leading block from the iterative solver,
  NaN beyond it). A plot added after a run, or one whose `layer` is linked, therefore finds the last run's
  spectra without sampling again.
- For an unfiltered kind, only on the layers a plot asks for (armed): that needs a decomposition of its own. The
  attention node arms the layers of the plots it finds downstream in the prompt (all layers when a plot's layer is
  linked); a plot that finds nothing arms its layer for the next sampling.
Only the cond chunk's anchors are kept, per layer and step, for the latest run on each sampled model: two samplers
fed by different clones of one patched model keep separate records, and a plot reads those of the model it is
given (or, for a model that was not sampled itself, such as the attention node's output ahead of a LoRA, those of
the latest run). Records live on the device during the run and move to the CPU when it ends.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import Tensor

from ..attention.device import singular_values
from .run_context import SPECTRA_SCRATCH_PREFIX, PackPatcher


@dataclass
class StepSpectra:
    """One layer at one step: per matrix kind ("K", "V"), singular values before and after, [anchors, r]."""

    before: dict[str, Tensor] = field(default_factory=dict)
    after: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class RunSpectra:
    """What one sampling run recorded: layer index -> step -> spectra, and each kind's filter as text."""

    records: dict[int, dict[int, StepSpectra]] = field(default_factory=dict)
    filters: dict[str, str] = field(default_factory=dict)

    def to_cpu(self) -> None:
        for steps in self.records.values():
            for spectra in steps.values():
                for values in (spectra.before, spectra.after):
                    for kind, tensor in values.items():
                        values[kind] = tensor.cpu()


class SpectrumRecorder:
    def __init__(self, layer_keys: list[tuple[str, int, int]], svd_on_device: bool | None = None):
        self.layer_keys = list(layer_keys)
        self.armed_layers: set[int] = set()
        self.svd_on_device = svd_on_device  # None: wherever the device has an SVD (not on Apple MPS)
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._latest: RunSpectra | None = None
        self._scratch_key = f"{SPECTRA_SCRATCH_PREFIX}.{id(self)}"

    def arm(self, layer_index: int) -> None:
        self.armed_layers.add(layer_index)

    def arm_all(self) -> None:
        self.armed_layers.update(range(len(self.layer_keys)))

    def wants(self, layer_index: int) -> bool:
        """Whether an unfiltered kind of this layer is decomposed for recording."""
        return layer_index in self.armed_layers

    def spectra_for(self, model_patcher) -> RunSpectra | None:
        """The latest run's records of this model, or of the latest run of any model sharing this recorder."""
        try:
            own = self._by_model.get(model_patcher)
        except TypeError:  # not weak-referenceable: only the latest run can answer
            own = None
        return own if own is not None else self._latest

    @property
    def records(self) -> dict[int, dict[int, StepSpectra]]:
        """The latest run's records (any model)."""
        return self._latest.records if self._latest is not None else {}

    def _run_spectra(self, run) -> RunSpectra:
        spectra = run.scratch.get(self._scratch_key)
        if spectra is None:
            spectra = RunSpectra()
            run.scratch[self._scratch_key] = spectra
            self._latest = spectra
            if run.model_patcher is not None:
                try:
                    self._by_model[run.model_patcher] = spectra
                except TypeError:
                    pass
            run.on_end.append(spectra.to_cpu)
        return spectra

    def recording_filter(self, spectrum, kind: str, layer_index: int, call, cond_or_uncond: list[int]):
        """A filter that does what `spectrum` does (or nothing) and records the cond chunk's anchor spectra.

        Returns `spectrum` unchanged where nothing is to be recorded (uncond-only calls, unfiltered kinds of
        layers no plot asked for).
        """
        if call is None or call.run is None or 0 not in cond_or_uncond:
            return spectrum
        if spectrum is None and not self.wants(layer_index):
            return spectrum
        svd_on_device = self.svd_on_device

        def record(x: Tensor) -> Tensor:
            if spectrum is None:
                filtered = x
                before = after = singular_values(x, on_device=svd_on_device)
            else:
                filtered, before, after = spectrum.filter_with_values(x)
            self.keep(kind, spectrum, layer_index, call, cond_or_uncond, before, after)
            return filtered

        return record

    def keep(self, kind: str, spectrum, layer_index: int, call, cond_or_uncond: list[int],
             before: Tensor | None, after: Tensor | None) -> None:
        """Keep the cond chunk's anchor rows of singular values a filter computed, [chunks * anchors, r] in
        cond_or_uncond's order; nothing outside a sampling run, for uncond-only calls, or without values."""
        if before is None or after is None or call is None or call.run is None or 0 not in cond_or_uncond:
            return
        spectra = self._run_spectra(call.run)
        spectra.filters[kind] = repr(spectrum) if spectrum is not None else "none"
        anchors = before.shape[0] // len(cond_or_uncond)
        cond_chunk = cond_or_uncond.index(0)
        rows = slice(cond_chunk * anchors, (cond_chunk + 1) * anchors)
        step = spectra.records.setdefault(layer_index, {}).setdefault(call.step, StepSpectra())
        step.before[kind] = before[rows].detach().float()
        step.after[kind] = after[rows].detach().float()


def recorder_of(model_patcher) -> SpectrumRecorder | None:
    return PackPatcher(model_patcher).spectrum_recorder
