"""attention/grid.py: token grids from the latent's size, including grids other nodes resize (Deep Shrink)."""

from __future__ import annotations

import pytest

from spectral_anchors.attention.grid import token_grid


@pytest.mark.parametrize("latent, tokens, grid", [
    ((128, 128), 4096, (64, 64)),
    ((128, 192), 1536, (32, 48)),
    ((17, 23), 30, (5, 6)),  # odd sizes round up at every stride-2 downsampling: 17x23 -> 9x12 -> 5x6
])
def test_halvings_of_the_latent(latent, tokens, grid):
    assert token_grid(*latent, tokens) == grid


@pytest.mark.parametrize("latent, tokens, grid", [
    # PatchModelAddDownscale with factor 1.5 at SDXL's second level: round(64 / 1.5) = 43, 96 / 1.5 = 64.
    ((128, 192), 43 * 64, (43, 64)),
    ((128, 192), 22 * 32, (22, 32)),  # the next stride-2 downsampling of 43x64
    ((128, 128), 43 * 43, (43, 43)),
    ((16, 24), 5 * 8, (5, 8)),  # the tiny test UNet's 8x12 level scaled by 1 / 1.5
    ((16, 24), 3 * 4, (3, 4)),
    ((24, 16), 8 * 5, (8, 5)),  # portrait keeps its orientation
])
def test_grids_resized_by_any_factor_keep_the_latents_aspect(latent, tokens, grid):
    assert token_grid(*latent, tokens) == grid


def test_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="at least one token"):
        token_grid(8, 8, 0)
