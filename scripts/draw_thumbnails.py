"""Draw the template browser's thumbnails (workflows/<title>.jpg): what each workflow makes, as an illustration.

No real SDXL output exists where the pack is built, so each thumbnail is a drawing of the result (one character in
several scenes, a comparison, a plot), not a render. Run it after renaming or adding a workflow:

    .venv/bin/python scripts/draw_thumbnails.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from workflow_graphs import WORKFLOWS  # noqa: E402

SIZE = (480, 360)
INK, PAPER, ACCENT, MUTED = (37, 34, 61), (244, 239, 230), (230, 110, 20), (138, 134, 168)
# The explorer of the example story in six scenes: a sky colour and a ground colour each.
SCENES = [((34, 92, 52), (20, 60, 30)), ((170, 200, 235), (240, 245, 250)), ((120, 84, 60), (90, 60, 40)),
          ((150, 170, 180), (70, 100, 120)), ((20, 24, 60), (90, 80, 70)), ((40, 44, 70), (60, 62, 80))]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _explorer(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], pose: int, colours=None) -> None:
    """The character: curly red hair, round glasses, a green backpack. pose shifts and tilts it a little."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    cx = x0 + width * (0.5 + 0.12 * math.sin(pose * 1.7))
    hair, skin, coat, pack = colours or ((200, 70, 30), (238, 200, 170), (70, 90, 150), (60, 130, 60))
    head = width * 0.13
    top = y0 + height * 0.28
    draw.rounded_rectangle([cx - head * 1.5, top + head * 2.2, cx + head * 1.5, y1 - height * 0.08],
                           radius=int(head), fill=coat)
    draw.rounded_rectangle([cx + head * 1.1, top + head * 2.5, cx + head * 2.1, top + head * 4.6],
                           radius=int(head * 0.3), fill=pack)
    draw.ellipse([cx - head, top, cx + head, top + head * 2], fill=skin)
    for angle in range(0, 360, 40):
        rx = cx + head * 0.95 * math.cos(math.radians(angle + 200) if angle < 180 else math.radians(angle + 200))
        ry = top + head * 0.6 + head * 0.7 * math.sin(math.radians(angle + 200))
        if ry < top + head * 0.9:
            draw.ellipse([rx - head * 0.4, ry - head * 0.4, rx + head * 0.4, ry + head * 0.4], fill=hair)
    for side in (-1, 1):
        gx = cx + side * head * 0.42
        draw.ellipse([gx - head * 0.3, top + head * 0.9, gx + head * 0.3, top + head * 1.5], outline=INK, width=2)


def _scene(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], index: int, character=True, colours=None):
    sky, ground = SCENES[index % len(SCENES)]
    x0, y0, x1, y1 = box
    horizon = y0 + (y1 - y0) * 0.62
    draw.rectangle([x0, y0, x1, horizon], fill=sky)
    draw.rectangle([x0, horizon, x1, y1], fill=ground)
    if index == 4:  # starry sky
        for star in range(9):
            sx, sy = x0 + (x1 - x0) * ((star * 37) % 100) / 100, y0 + (horizon - y0) * ((star * 53) % 90) / 100
            draw.ellipse([sx - 1.5, sy - 1.5, sx + 1.5, sy + 1.5], fill=(250, 250, 210))
    if index == 1:  # mountain ridge
        draw.polygon([(x0, horizon), ((x0 + x1) / 2, y0 + (y1 - y0) * 0.3), (x1, horizon)], fill=(225, 232, 242))
    if character:
        _explorer(draw, box, index, colours)


def _title(image: Image.Image, text: str) -> None:
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, SIZE[1] - 44, SIZE[0], SIZE[1]], fill=INK)
    draw.text((14, SIZE[1] - 22), text, fill=PAPER, font=_font(19), anchor="lm")


def _grid(image: Image.Image, columns: int, rows: int, top: int, bottom: int, **scene) -> None:
    draw = ImageDraw.Draw(image)
    gap = 10
    cell_w = (SIZE[0] - gap * (columns + 1)) / columns
    cell_h = (bottom - top - gap * (rows + 1)) / rows
    for number in range(columns * rows):
        col, row = number % columns, number // columns
        x0, y0 = gap + col * (cell_w + gap), top + gap + row * (cell_h + gap)
        _scene(draw, (int(x0), int(y0), int(x0 + cell_w), int(y0 + cell_h)), number, **scene)
        if number < 2:  # the anchors
            draw.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], outline=ACCENT, width=3)


def character_sheet(label: str) -> Image.Image:
    image = Image.new("RGB", SIZE, PAPER)
    _grid(image, 3, 2, 0, SIZE[1] - 44)
    _title(image, label)
    return image


def comparison() -> Image.Image:
    image = Image.new("RGB", SIZE, PAPER)
    draw = ImageDraw.Draw(image)
    gap, top, bottom = 10, 26, SIZE[1] - 44
    cell_w, cell_h = (SIZE[0] - 4 * gap) / 3, (bottom - top - 4 * gap) / 3
    drifting = [((90, 60, 40), (230, 190, 160), (160, 60, 60), (130, 110, 70)),
                ((230, 200, 90), (220, 180, 150), (60, 120, 90), (120, 60, 140)),
                ((40, 40, 40), (240, 210, 180), (200, 150, 60), (60, 60, 120))]
    for column, name in enumerate(("vanilla", "ConsiStory", "spectral")):
        draw.text((gap + column * (cell_w + gap) + cell_w / 2, 13), name, fill=INK, font=_font(15), anchor="mm")
        for row in range(3):
            x0, y0 = gap + column * (cell_w + gap), top + gap + row * (cell_h + gap)
            colours = drifting[row] if column == 0 else None
            _scene(draw, (int(x0), int(y0), int(x0 + cell_w), int(y0 + cell_h)), row * 2, colours=colours)
    _title(image, "Same seed, three methods, one row per scene")
    return image


def consistory() -> Image.Image:
    image = Image.new("RGB", SIZE, PAPER)
    _grid(image, 3, 2, 0, SIZE[1] - 44)
    draw = ImageDraw.Draw(image)
    gap, cell_w, cell_h = 10, (SIZE[0] - 40) / 3, (SIZE[1] - 44 - 30) / 2
    for number in range(6):  # the subject masks, dashed
        col, row = number % 3, number // 3
        x0, y0 = gap + col * (cell_w + gap), gap + row * (cell_h + gap)
        cx = x0 + cell_w * (0.5 + 0.12 * math.sin(number * 1.7))
        for dash in range(0, 360, 30):
            a, b = math.radians(dash), math.radians(dash + 15)
            rx, ry = cell_w * 0.3, cell_h * 0.42
            cy = y0 + cell_h * 0.58
            draw.line([(cx + rx * math.cos(a), cy + ry * math.sin(a)), (cx + rx * math.cos(b), cy + ry * math.sin(b))],
                      fill=(255, 255, 255), width=2)
    _title(image, "ConsiStory: subject masks and feature injection")
    return image


def spectrum_plot() -> Image.Image:
    image = Image.new("RGB", SIZE, PAPER)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 30, SIZE[0] - 24, SIZE[1] - 84
    draw.rectangle([left, top, right, bottom], outline=INK, width=2)
    for decade in range(4):
        y = top + (bottom - top) * decade / 3
        draw.line([(left, y), (right, y)], fill=(220, 215, 205))
        draw.text((left - 8, y), f"1e{3 - decade}", fill=INK, font=_font(13), anchor="rm")
    count = 60

    def point(index: int, value: float) -> tuple[float, float]:
        return left + (right - left) * index / (count - 1), bottom - (bottom - top) * value

    before = [point(i, 0.95 * math.exp(-i / 14) + 0.05) for i in range(count)]
    kept = 12
    after = [point(i, 0.8 * math.exp(-i / 30) + 0.12) for i in range(kept)]
    after += [point(kept, 0.0), point(count - 1, 0.0)]
    draw.line(before, fill=MUTED, width=4)
    draw.line(after, fill=ACCENT, width=3)
    draw.text((right - 150, top + 14), "before filtering", fill=MUTED, font=_font(14))
    draw.text((right - 150, top + 34), "after (12 of 60 kept)", fill=ACCENT, font=_font(14))
    draw.text(((left + right) / 2, bottom + 16), "index of singular value", fill=INK, font=_font(13), anchor="mm")
    _title(image, "Spectrum plot: what the filters kept")
    return image


def basic() -> Image.Image:
    image = Image.new("RGB", SIZE, PAPER)
    draw = ImageDraw.Draw(image)
    gap, bottom = 10, SIZE[1] - 44
    cell_w = (SIZE[0] - 5 * gap) / 4
    fox = ((200, 100, 40), (225, 130, 60), (60, 80, 160), (60, 80, 160))
    for number in range(4):
        x0 = gap + number * (cell_w + gap)
        box = (int(x0), 60, int(x0 + cell_w), int(bottom - 50))
        draw.rectangle(box, fill=(120, 84, 60))
        _explorer(draw, box, number, fox)
        if number < 2:
            draw.rectangle(box, outline=ACCENT, width=3)
    draw.text((SIZE[0] / 2, 30), "one prompt, a batch of four, one node", fill=INK, font=_font(16), anchor="mm")
    _title(image, "The smallest setup: Spectral Anchor Attention")
    return image


def drawings() -> dict[str, Image.Image]:
    """The thumbnail of every workflow, by its name in workflow_graphs.py."""
    return {
        "spectral_character_sheet_sdxl": character_sheet("One character, six scenes, one sheet"),
        "spectral_character_sheet_sd15": character_sheet("The character sheet on SD 1.5"),
        "side_by_side_comparison_sdxl": comparison(),
        "consistory_baseline_sdxl": consistory(),
        "spectrum_plot_sdxl": spectrum_plot(),
        "anchor_attention_basic": basic(),
    }


def main() -> None:
    for name, image in drawings().items():
        path = ROOT / "workflows" / f"{WORKFLOWS[name].title}.jpg"
        image.save(path, quality=82, optimize=True)
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
