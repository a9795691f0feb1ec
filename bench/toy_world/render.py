"""Pictures of toy latents for people (the metrics never look at these): channels 1-3 as RGB, channel 0 as light."""

from __future__ import annotations

from torch import Tensor

SCALE = 6  # screen pixels per latent pixel


def latent_rgb(latent: Tensor) -> Tensor:
    """[4, H, W] -> [3, H, W] in 0..1."""
    return (0.5 + 0.4 * latent[1:4] + 0.15 * latent[0:1]).clamp(0.0, 1.0)


def grid_image(rows: list[Tensor], labels: list[str] | None = None, gap: int = 2):
    """A Pillow image: each row a batch [B, 4, H, W] of latents, optional text label left of each row."""
    from PIL import Image, ImageDraw

    label_width = 150 if labels else 0
    height, width = rows[0].shape[-2] * SCALE, rows[0].shape[-1] * SCALE
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (label_width + columns * (width + gap), len(rows) * (height + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (height + gap)
        if labels:
            draw.text((4, y + height // 2 - 6), labels[r], fill="black")
        for c, latent in enumerate(row):
            pixels = (latent_rgb(latent.float()).permute(1, 2, 0).numpy() * 255).astype("uint8")
            tile = Image.fromarray(pixels).resize((width, height), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (width + gap), y))
    return canvas
