"""Reference images for the toy world: clean world images of one subject, the user's "own character".

Shared by bench/reference_quality.py and tests/bench/test_reference_toy.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import world

REFERENCE_SEED = 50_000  # world seeds of the references: apart from the detector's and the training data's


def one_subject_references(scenes: list[int], size: int, seed: int) -> Tensor:
    """Clean world images [len(scenes), 4, size, size] of one subject, one per scene: the first image's subject
    colours and pattern kind painted onto every image's own instances (own sizes and places, own background tint)."""
    count = len(scenes)
    batch = world.generate(count, size, torch.Generator().manual_seed(REFERENCE_SEED + seed),
                           scenes=torch.tensor(scenes), present=torch.ones(count, dtype=torch.bool))
    latents = batch.latents.clone()
    body, pattern_colour, pattern = batch.body[0], batch.pattern_colour[0], int(batch.pattern[0])
    for image in range(1, count):
        for instance in range(batch.side.shape[1]):
            side = int(batch.side[image, instance])
            top, left = int(batch.top[image, instance]), int(batch.left[image, instance])
            inner = world.pattern_mask(pattern, side)
            latents[image, :, top:top + side, left:left + side] = torch.where(
                inner[None], pattern_colour[:, None, None], body[:, None, None])
    return latents
