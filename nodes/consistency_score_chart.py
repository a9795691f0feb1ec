"""Drawing a sheet's consistency scores: one bar per image, in the style of the spectrum plot (spectrum_plot.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .spectrum_plot import AFTER_COLOUR, AXIS_COLOUR, BEFORE_COLOUR, GRID_COLOUR, TEXT_COLOUR

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 24, 116, 58
PLOT_HEIGHT = 300
BAR_PITCH, MIN_WIDTH, MAX_WIDTH = 44, 560, 2400
ANCHOR_COLOUR, TARGET_COLOUR, SCORE_COLOUR = BEFORE_COLOUR, AFTER_COLOUR, (200, 30, 60)


def draw_scores(values: Sequence[float], is_anchor: Sequence[bool], numbers: Sequence[int], title: str,
                subtitles: Sequence[str], score: float) -> Tensor:
    """An IMAGE [1, H, W, 3]: a bar per image (value = cosine similarity, NaN = not applicable), the score as a
    dashed line. numbers are the images' 1-based positions in the batch, written under the bars; subtitles are
    lines under the title (cut to the image's width)."""
    count = len(values)
    width = int(min(MAX_WIDTH, max(MIN_WIDTH, MARGIN_LEFT + MARGIN_RIGHT + BAR_PITCH * count)))
    height = MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((12, 10), title, fill=TEXT_COLOUR, font=ImageFont.load_default(size=18))
    for line, subtitle in enumerate(subtitles[:2]):
        while subtitle and draw.textlength(subtitle, font=font) > width - 24:
            subtitle = subtitle[:-4] + "..."
        draw.text((12, 36 + 18 * line), subtitle, fill=TEXT_COLOUR, font=font)
    plot_left, plot_top = MARGIN_LEFT, MARGIN_TOP
    plot_right, plot_bottom = width - MARGIN_RIGHT, MARGIN_TOP + PLOT_HEIGHT
    finite = [value for value in values if math.isfinite(value)] + ([score] if math.isfinite(score) else [])
    # Cosines lie in [-1, 1]; the axis starts at 0 unless a value is negative, and ends at 1.
    low = min(0.0, math.floor(min(finite, default=0.0) * 10) / 10)

    def y_of(value: float) -> float:
        return plot_bottom - (plot_bottom - plot_top) * (value - low) / (1.0 - low)

    steps = round((1.0 - low) / 0.1)
    for step in range(steps + 1):
        tick = low + step * 0.1
        y = y_of(tick)
        draw.line([(plot_left, y), (plot_right, y)], fill=GRID_COLOUR)
        if step % (2 if steps > 10 else 1) == 0:
            draw.text((plot_left - 8, y), f"{tick:.1f}", fill=TEXT_COLOUR, font=font, anchor="rm")
    draw.rectangle([plot_left, plot_top, plot_right, plot_bottom], outline=AXIS_COLOUR)
    draw.text((12, 84), "cosine similarity", fill=TEXT_COLOUR, font=font)
    pitch = (plot_right - plot_left) / max(count, 1)
    bar = max(2.0, pitch * 0.7)
    label_every = max(1, math.ceil(24 / pitch))
    for index, (value, anchor, number) in enumerate(zip(values, is_anchor, numbers, strict=True)):
        centre = plot_left + pitch * (index + 0.5)
        if math.isfinite(value):
            top, base = sorted((y_of(value), y_of(max(low, 0.0))))
            draw.rectangle([centre - bar / 2, top, centre + bar / 2, base],
                           fill=ANCHOR_COLOUR if anchor else TARGET_COLOUR)
            if pitch >= 40:
                draw.text((centre, top - 3), f"{value:.2f}", fill=TEXT_COLOUR, font=font, anchor="md")
        else:
            draw.text((centre, plot_bottom - 6), "n/a", fill=TEXT_COLOUR, font=font, anchor="md")
        if index % label_every == 0:
            draw.text((centre, plot_bottom + 6), str(number), fill=TEXT_COLOUR, font=font, anchor="ma")
    draw.text(((plot_left + plot_right) / 2, plot_bottom + 26), "image (position in the batch)", fill=TEXT_COLOUR,
              font=font, anchor="ma")
    if math.isfinite(score):
        y = y_of(score)
        for x in range(plot_left, plot_right, 12):
            draw.line([(x, y), (min(x + 7, plot_right), y)], fill=SCORE_COLOUR, width=2)
    legend_x, legend_y = plot_right - 250, 84
    entries = [("anchor", ANCHOR_COLOUR), ("target", TARGET_COLOUR), (f"score {score:.3f}", SCORE_COLOUR)]
    for offset, (label, colour) in enumerate(entries):
        x = legend_x + 84 * offset
        draw.rectangle([x, legend_y + 2, x + 14, legend_y + 14], fill=colour)
        draw.text((x + 19, legend_y), label, fill=TEXT_COLOUR, font=font)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)
