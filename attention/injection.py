"""Feature injection: matched attention outputs of the sources blended into each image (docs/method.md section 2).

In the chosen self-attention layers, during the window's steps and for the cond chunk only, every injected token p
of image i takes  strength x (output of its matched source token) + (1 - strength) x (its own output).
Sources are read from a copy of the outputs, never from already blended rows: an anchor can be a source and a
receiver in the same layer.

Blending after the layer's to_out projection is exactly the same as blending before it: to_out is affine
(W x + b) and the two weights sum to 1, so W (s a + (1 - s) b) + b = s (W a + b) + (1 - s) (W b + b).

When: the steps whose sigma lies in ComfyUI's percent window (model_sampling.percent_to_sigma of start and end, as
ControlNet's and Deep Shrink's windows; see nodes/feature_injection_passes.py). The feature step of the two-pass variant
is the schedule step whose model timestep is nearest the target (261 of 1000).

Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .correspondence import Correspondence

# ConsiStory injects during steps n/10 .. n/3 and reads its features at the timestep nearest 261 of 1000. On
# ComfyUI's normal and simple schedules step i of n sits at about percent i/n, so these percents are that window.
DEFAULT_START = 0.1
DEFAULT_END = 0.333
FEATURE_TIMESTEP = 261


def nearest_step(timesteps: Sequence[float], target: float) -> int:
    """Index of the timestep nearest `target` (ties: the earlier step)."""
    if not timesteps:
        raise ValueError("nearest_step needs at least one timestep")
    return min(range(len(timesteps)), key=lambda i: (abs(float(timesteps[i]) - target), i))


@dataclass(frozen=True)
class InjectionIndex:
    """Flat token indices inside one chunk of [images x tokens]: target[k] receives from source[k]."""

    image_count: int
    token_count: int
    target: Tensor
    source: Tensor

    @property
    def is_empty(self) -> bool:
        return self.target.numel() == 0

    def to(self, device: torch.device) -> InjectionIndex:
        if self.target.device == device:
            return self
        return InjectionIndex(self.image_count, self.token_count, self.target.to(device), self.source.to(device))


def injection_index(correspondence: Correspondence) -> InjectionIndex:
    """The injected tokens of a correspondence as flat (target, source) index pairs."""
    tokens = correspondence.token_count
    images, positions = correspondence.injected.nonzero(as_tuple=True)
    target = images * tokens + positions
    source = correspondence.source_image[images, positions] * tokens + correspondence.source_token[images, positions]
    return InjectionIndex(correspondence.image_count, tokens, target, source)


def inject_matched_outputs(outputs: Tensor, first_row: int, index: InjectionIndex, strength: float) -> Tensor:
    """outputs [rows, N, C] with the chunk starting at row `first_row` blended per `index`; a new tensor.

    Rows outside the chunk and tokens outside index.target are returned unchanged (bit for bit).
    """
    rows, tokens, channels = outputs.shape
    if tokens != index.token_count or first_row + index.image_count > rows:
        raise ValueError(f"injection index for {index.image_count} images x {index.token_count} tokens does not fit "
                         f"outputs {tuple(outputs.shape)} at row {first_row}")
    original = outputs.reshape(rows * tokens, channels)
    blended = original.clone()
    if index.is_empty:
        return blended.reshape(rows, tokens, channels)
    offset = first_row * tokens
    target = index.target.to(outputs.device) + offset
    source = index.source.to(outputs.device) + offset
    blended[target] = strength * original[source] + (1.0 - strength) * original[target]
    return blended.reshape(rows, tokens, channels)
