"""Query blending, ConsiStory's "share queries" (docs/method.md section 2).

During the first n/10 steps the shared layers' queries are pulled toward those of a plain (non-extended) forward:
Q <- s_i Q_plain + (1 - s_i) Q, with s falling linearly from 0.9 to 0.82 over those steps. Sharing alone makes
the images' layouts collapse toward the anchors'; the plain queries restore the variety. Plain PyTorch.
"""

from __future__ import annotations

from torch import Tensor

BLEND_START = 0.9
BLEND_END = 0.82
# ConsiStory blends during the first tenth of the steps (5 of 50).
BLEND_FRACTION_DIVISOR = 10


def blend_step_count(step_count: int) -> int:
    """How many leading steps blend: n // 10 (none below 10 steps; 5 of 50)."""
    return max(step_count, 0) // BLEND_FRACTION_DIVISOR


def query_blend_weight(step: int, step_count: int, start: float = BLEND_START, end: float = BLEND_END) -> float | None:
    """s_i for step i, falling linearly from start (step 0) to end (the last blending step); None after them."""
    steps = blend_step_count(step_count)
    if not 0 <= step < steps:
        return None
    if steps == 1:
        return start
    return start + (end - start) * step / (steps - 1)


def blend_queries(plain: Tensor, shared: Tensor, weight: float) -> Tensor:
    """s Q_plain + (1 - s) Q. With s = 0 this is Q exactly (bit for bit)."""
    return weight * plain.to(shared.dtype) + (1.0 - weight) * shared
