"""Where in the sampling schedule a run is: the step index of a sigma and whether a window is open."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Sigmas of one schedule are compared with a relative tolerance: samplers hand the model the schedule's own
# values, but some pass them through a dtype round trip.
_RELATIVE_TOLERANCE = 1e-4


def step_index(sigma: float, schedule: Sequence[float]) -> int:
    """Index of the step whose sigma this is: the number of schedule sigmas strictly above it.

    An evaluation between two steps (Heun's corrector, a multistep sampler's midpoint) counts as the later one.
    """
    return sum(1 for s in schedule[:-1] if s > sigma * (1.0 + _RELATIVE_TOLERANCE))


@dataclass(frozen=True)
class SigmaWindow:
    """Open while start_sigma >= sigma >= end_sigma, the convention of ComfyUI's own percent ranges."""

    start_sigma: float
    end_sigma: float

    def contains(self, sigma: float) -> bool:
        return self.start_sigma * (1.0 + _RELATIVE_TOLERANCE) >= sigma >= self.end_sigma * (1.0 - _RELATIVE_TOLERANCE)


def steps_in_window(schedule: Sequence[float], window: SigmaWindow) -> range:
    """The steps of a schedule (its sigmas, the final one excluded) whose sigma lies in the window (maybe none).

    A schedule's sigmas fall, so the steps inside a window are consecutive.
    """
    inside = [step for step, sigma in enumerate(schedule[:-1]) if window.contains(sigma)]
    return range(inside[0], inside[-1] + 1) if inside else range(0)
