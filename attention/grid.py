"""Token grids of UNet attention layers, derived from the latent's height and width (never from sqrt(N))."""

from __future__ import annotations


def token_grid(latent_height: int, latent_width: int, tokens: int) -> tuple[int, int]:
    """The (height, width) of a layer's token grid.

    Each UNet downsampling halves the grid with a stride-2 convolution, which rounds odd sizes up.
    """
    height, width = latent_height, latent_width
    while height * width > tokens and (height > 1 or width > 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens do not form a downsampled grid of a {latent_height}x{latent_width} latent")
    return height, width
