"""Drawing recorded spectra like the research's figures: log-scale singular value against index, before and after."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PANEL_WIDTH, PANEL_HEIGHT = 520, 356
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 56, 50
HEADER = 46
BEFORE_COLOUR, AFTER_COLOUR = (90, 110, 140), (230, 110, 20)
AXIS_COLOUR, GRID_COLOUR, TEXT_COLOUR = (40, 40, 40), (225, 225, 225), (20, 20, 20)
# Values below this fraction of a panel's largest value are drawn on the floor: truncation makes exact zeros,
# which a log axis cannot show.
FLOOR_FRACTION = 1e-6


def draw_spectra(panels: list[tuple[str, Tensor, Tensor]], title: str) -> Tensor:
    """An IMAGE [1, H, W, 3] with one panel per matrix: (panel title, values before [r], values after [r])."""
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (columns * PANEL_WIDTH, HEADER + rows * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 12), title, fill=TEXT_COLOUR, font=ImageFont.load_default(size=18))
    for number, (panel_title, before, after) in enumerate(panels):
        left = (number % columns) * PANEL_WIDTH
        top = HEADER + (number // columns) * PANEL_HEIGHT
        _draw_panel(draw, left, top, panel_title, before, after)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


def _draw_panel(draw: ImageDraw.ImageDraw, left: int, top: int, title: str, before: Tensor, after: Tensor) -> None:
    font = ImageFont.load_default(size=13)
    plot_left, plot_top = left + MARGIN_LEFT, top + MARGIN_TOP
    plot_right, plot_bottom = left + PANEL_WIDTH - MARGIN_RIGHT, top + PANEL_HEIGHT - MARGIN_BOTTOM
    before, after = before.double(), after.double()
    total = before.numel()
    # NaN marks values that were not computed: the iterative solver's tail, or a matrix with non-finite entries.
    known = torch.isfinite(before) & torch.isfinite(after)
    before, after = before[known], after[known]
    peak = float(torch.cat([before, after]).max()) if before.numel() else 0.0
    draw.text((left + 10, top + 8), title, fill=TEXT_COLOUR, font=ImageFont.load_default(size=15))
    if total and not before.numel():
        draw.text((plot_left, plot_top + 40), "no spectrum: the matrix held non-finite values", fill=TEXT_COLOUR,
                  font=font)
        return
    if peak <= 0.0:
        draw.text((plot_left, plot_top + 40), "all singular values are zero", fill=TEXT_COLOUR, font=font)
        return
    floor = peak * FLOOR_FRACTION
    low_decade = math.floor(math.log10(max(float(before[before > 0].min()) if (before > 0).any() else peak, floor)))
    high_decade = math.ceil(math.log10(peak))
    if high_decade == low_decade:
        high_decade += 1
    count = max(before.numel(), after.numel())

    def x_of(index: float) -> float:
        return plot_left + (plot_right - plot_left) * index / max(count - 1, 1)

    def y_of(value: float) -> float:
        exponent = math.log10(max(value, 10.0 ** low_decade))
        return plot_bottom - (plot_bottom - plot_top) * (exponent - low_decade) / (high_decade - low_decade)

    for decade in range(low_decade, high_decade + 1):
        y = y_of(10.0 ** decade)
        draw.line([(plot_left, y), (plot_right, y)], fill=GRID_COLOUR)
        draw.text((plot_left - 8, y), f"1e{decade}", fill=TEXT_COLOUR, font=font, anchor="rm")
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        index = round(fraction * (count - 1))
        draw.text((x_of(index), plot_bottom + 6), str(index), fill=TEXT_COLOUR, font=font, anchor="ma")
    draw.rectangle([plot_left, plot_top, plot_right, plot_bottom], outline=AXIS_COLOUR)
    draw.text(((plot_left + plot_right) / 2, plot_bottom + 24), "index of singular value", fill=TEXT_COLOUR,
              font=font, anchor="ma")
    axis_label = "singular value (log scale)"
    if before.numel() < total:
        axis_label += f"; the leading {before.numel()} of {total}, all the fast solver computes"
    draw.text((left + 10, top + 32), axis_label, fill=TEXT_COLOUR, font=font)
    for values, colour, width in ((before, BEFORE_COLOUR, 3), (after, AFTER_COLOUR, 2)):
        points = [(x_of(i), y_of(float(v))) for i, v in enumerate(values.tolist())]
        if len(points) == 1:
            points.append(points[0])
        draw.line(points, fill=colour, width=width)
    kept = int((after > floor).sum())
    legend_x, legend_y = plot_right - 170, plot_top + 8
    for offset, (label, colour) in enumerate((("before filtering", BEFORE_COLOUR),
                                              (f"after ({kept} of {total} kept)", AFTER_COLOUR))):
        y = legend_y + 18 * offset
        draw.line([(legend_x, y + 7), (legend_x + 22, y + 7)], fill=colour, width=3)
        draw.text((legend_x + 28, y), label, fill=TEXT_COLOUR, font=font)
