"""A story's images in scene order, and one sheet of them: the rules behind the SpectralSheet node.

Plain torch and Pillow (no comfy): IMAGE tensors are [B, H, W, C] floats in 0..1, as ComfyUI passes them.
Labels use Pillow's own default font (no font file is read or downloaded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .story import StoryLayout

NODE_NAME = "Spectral Sheet"
MAX_LABEL_LINES = 3
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


def sheet_error(input_name: str, message: str) -> ValueError:
    """The error ComfyUI shows the user: it names this node and the input to fix."""
    return ValueError(f"{NODE_NAME}, input '{input_name}': {message}")


def scene_images(batches: Sequence[torch.Tensor], layout: StoryLayout) -> torch.Tensor:
    """One IMAGE batch of every scene in scene order, each once, from the decoded images of the story's runs.

    `batches` is one IMAGE per run, in run order. A list whose entries hold fewer rows each (e.g. split by
    Rebatch Images) is accepted when its rows, in order, are the runs' rows.
    """
    if not batches:
        raise sheet_error("images", "no images. Connect the VAE Decode of the sampler that samples the story's runs.")
    for index, batch in enumerate(batches):
        if not torch.is_tensor(batch) or batch.ndim != 4:
            raise sheet_error("images", f"entry {index + 1} is not an IMAGE batch. Connect a VAE Decode output.")
    sizes = {tuple(batch.shape[1:3]) for batch in batches}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
        raise sheet_error("images", f"the runs' images differ in size ({listed}). Decode every run at one size.")
    expected = layout.rows_per_run
    found = tuple(int(batch.shape[0]) for batch in batches)
    if len(batches) == layout.run_count:
        wrong = [index for index, (rows, want) in enumerate(zip(found, expected, strict=True)) if rows != want]
        if wrong:
            index = wrong[0]
            raise sheet_error(
                "images",
                f"entry {index + 1} has {found[index]} images, but run {index + 1} of the story has "
                f"{expected[index]} (runs: {_counts(expected)}; images: {_counts(found)}). Feed this node the decoded "
                "images of every run of the same story, in order and unfiltered.")
        runs = list(batches)
    elif sum(found) == sum(expected):
        rows = torch.cat(list(batches))
        bounds = np.cumsum((0, *expected))
        runs = [rows[int(start):int(stop)] for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        raise sheet_error(
            "images",
            f"{len(batches)} image batches ({_counts(found)} images), but the story has {layout.run_count} runs of "
            f"{_counts(expected)} images. Feed this node the decoded images of every run of the story connected "
            "here (the sampler runs once per run), and the story of the Spectral Story Prompts node that made them.")
    cells = [runs[run][row] for run, row in layout.scene_order()]
    return torch.stack(cells)


def _counts(values: Sequence[int]) -> str:
    return " + ".join(str(value) for value in values) if values else "none"


def auto_columns(count: int, height: int, width: int) -> int:
    """A near-square sheet: columns ~ sqrt(count x height / width), rounded up, between 1 and count."""
    if count <= 0:
        return 1
    return max(1, min(count, math.ceil(math.sqrt(count * height / max(width, 1)) - 1e-9)))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: its own scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: its own bitmap font


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """The label's lines at this width, at most MAX_LABEL_LINES, the last one cut with an ellipsis if needed."""
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > MAX_LABEL_LINES:
        lines = lines[:MAX_LABEL_LINES]
        lines[-1] += " ..."
    fitted = []
    for line in lines:
        while line and draw.textlength(line, font=font) > width:  # one word wider than the cell
            line = line[:-4] + "..." if len(line) > 4 else ""
        fitted.append(line)
    return fitted


def draw_sheet(images: torch.Tensor, labels: Sequence[str] | None, columns: int, padding: int) -> torch.Tensor:
    """One grid image [1, H, W, 3]: cells of the images' own size, left to right and top to bottom, with each
    label (plain text) under its cell when labels are given."""
    count, height, width = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    columns = auto_columns(count, height, width) if columns <= 0 else min(columns, count)
    rows = math.ceil(count / columns)
    font_size = max(10, min(48, width // 24))
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(font_size * 1.25)
    wrapped = [_wrap(str(label), font, width - 4, measure) for label in labels] if labels is not None else None
    label_height = (max((len(lines) for lines in wrapped), default=0) * line_height + padding // 2 + 4
                    if wrapped else 0)
    cell_height = height + label_height
    sheet = Image.new("RGB", (columns * width + (columns + 1) * padding, rows * cell_height + (rows + 1) * padding),
                      BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    pixels = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    for index in range(count):
        left = padding + (index % columns) * (width + padding)
        top = padding + (index // columns) * (cell_height + padding)
        sheet.paste(Image.fromarray(pixels[index], "RGB"), (left, top))
        if wrapped:
            for number, line in enumerate(wrapped[index]):
                x = left + (width - draw.textlength(line, font=font)) / 2
                draw.text((x, top + height + 2 + number * line_height), line, fill=TEXT_COLOUR, font=font)
    return torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0)[None]
