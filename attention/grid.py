"""Token grids of UNet attention layers, derived from the latent's height and width (never from sqrt(N))."""

from __future__ import annotations

import math


def token_grid(latent_height: int, latent_width: int, tokens: int) -> tuple[int, int]:
    """The (height, width) of a layer's token grid.

    Each UNet downsampling halves the grid with a stride-2 convolution, which rounds odd sizes up. Other nodes may
    resize the UNet's features by any factor (Deep Shrink's PatchModelAddDownscale, e.g. by 1.5); a token count no
    halving of the latent gives is then read as the factor pair of `tokens` closest to the latent's aspect ratio.
    """
    if tokens < 1:
        raise ValueError(f"a token grid needs at least one token, got {tokens}")
    height, width = latent_height, latent_width
    while height * width > tokens and (height > 1 or width > 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width == tokens:
        return height, width
    return _closest_aspect_grid(latent_height / latent_width, tokens)


def _closest_aspect_grid(aspect: float, tokens: int) -> tuple[int, int]:
    best = (1, tokens)
    best_error = math.inf
    for height in range(1, math.isqrt(tokens) + 1):
        if tokens % height:
            continue
        for pair in ((height, tokens // height), (tokens // height, height)):
            error = abs(math.log(pair[0] / pair[1]) - math.log(aspect))
            if error < best_error:
                best, best_error = pair, error
    return best
