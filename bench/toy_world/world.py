"""The toy world: procedural 4-channel "latents" with a named scene and an optional two-colour subject.

Everything is generated directly in the model's latent space (no VAE). Channel 0 works like an alpha /
luminance channel: backgrounds sit well below zero on it and subjects well above, which lets the benchmark's
detector find a subject reliably even when a generated texture is blurred. Channels 1-3 carry colour.

- Scene (named by the conditioning): a scene colour plus a small random tile, repeated over the whole image with
  a random offset per image. The tiles are fine, high-rank detail (every token of the background differs from its
  neighbours), so the anchors' key/value spectra get tails where background lives.
- Background tint: every image's background is shifted by one of the four tints() (colours of equal size around
  zero), drawn at random and NOT in the conditioning. It is the part of a background that sharing could carry from the
  anchors to the targets, so background leakage is measurable as targets' tints following the anchors'.
- Subject (present iff the subject token is in the prompt): a pair of identical squares (INSTANCES), each of random
  side and position (never touching), whose body colour and pattern colour are random (two different colours of
  a palette of 8) and NOT in the conditioning; the pattern is one of three kinds (horizontal stripe, vertical
  stripe, central spot), also not in the conditioning. Consistency across a batch can therefore only come from
  sharing between images.

The world is defined by fixed seeds: the same (seed, size) always gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCENE_NAMES = ("meadow", "desert", "ocean", "forest", "city", "snow")
PATTERN_NAMES = ("hstripe", "vstripe", "spot")
CHANNELS = 4

# Tile periods (rows, columns): different per scene, all small, so the detail is fine.
_TILE_PERIODS = ((4, 6), (5, 5), (6, 4), (3, 7), (7, 3), (5, 6))
# Scene colours on channels 1-3: chosen well apart (pairwise distance >= 0.8) so scene identity is clear.
_SCENE_COLOURS = (
    (0.55, -0.35, 0.10),
    (-0.45, 0.50, 0.20),
    (0.05, 0.10, -0.60),
    (-0.50, -0.40, -0.20),
    (0.40, 0.45, 0.55),
    (-0.10, -0.55, 0.60),
)
BACKGROUND_LEVEL = -0.8  # channel 0 of every background
BACKGROUND_CH0_AMPLITUDE = 0.2  # tile amplitude on channel 0 (stays below SUBJECT_THRESHOLD)
BACKGROUND_COLOUR_AMPLITUDE = 0.55  # tile amplitude (std) on channels 1-3
TINT_AMPLITUDE = 0.16  # per channel on channels 1-3: a tint moves a background by 0.28, a third of the scene gap
SUBJECT_LEVEL = 1.0  # channel 0 of subject colours
SUBJECT_COLOUR_RANGE = 0.85  # channels 1-3 of subject colours are +-range (a palette of 8, see subject_palette)
PALETTE = 8
SUBJECT_THRESHOLD = 0.0  # channel 0 above this is subject (backgrounds stay below -0.4, subjects above 0.7)
WORLD_SEED = 20250

SUBJECT_PRESENT_PROBABILITY = 0.7
# The subject comes as a pair of identical instances (same colours, same pattern kind; own size and place). Like the
# repeated structures of natural images, this is what teaches the model's self-attention to carry appearance
# between distant tokens of the same thing, the mechanism anchor sharing relies on: with a single instance a tiny
# model decides a subject's colour from local convolutions alone and sharing has nothing to act through.
INSTANCES = 2


@dataclass(frozen=True)
class WorldSpec:
    """Geometry of one world size."""

    size: int  # latent height = width

    @property
    def side_range(self) -> tuple[int, int]:
        """Inclusive range of the subject's side length in latent pixels."""
        return max(4, round(self.size * 0.21)), max(5, round(self.size * 0.38))


def scene_tiles() -> list[Tensor]:
    """The fixed per-scene tiles [4, rows, cols], zero mean per channel."""
    generator = torch.Generator().manual_seed(WORLD_SEED)
    tiles = []
    for rows, cols in _TILE_PERIODS:
        tile = torch.randn(CHANNELS, rows, cols, generator=generator)
        tile = tile - tile.mean(dim=(1, 2), keepdim=True)
        tile = tile / tile.std(dim=(1, 2), keepdim=True)
        tile[0] *= BACKGROUND_CH0_AMPLITUDE / 2.0  # +-2 sd stays inside the channel-0 band
        tile[1:] *= BACKGROUND_COLOUR_AMPLITUDE
        tiles.append(tile)
    return tiles


def tints() -> Tensor:
    """[4, 4]: the background tints, corners of a regular tetrahedron on channels 1-3 (zero mean), 0 on channel 0."""
    signs = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    return torch.cat([torch.zeros(4, 1), signs * TINT_AMPLITUDE], dim=1)


def scene_colour(scene: int) -> Tensor:
    """The scene's mean over the 4 channels."""
    return torch.tensor((BACKGROUND_LEVEL, *_SCENE_COLOURS[scene]))


def tiled(tile: Tensor, size: int, offset_y: int, offset_x: int) -> Tensor:
    """The tile repeated over a size x size image, shifted by the offset."""
    rows, cols = tile.shape[1:]
    ys = (torch.arange(size) + offset_y) % rows
    xs = (torch.arange(size) + offset_x) % cols
    return tile[:, ys][:, :, xs]


@dataclass
class WorldBatch:
    """Clean latents and the ground truth the detector is validated against."""

    latents: Tensor  # [B, 4, H, W] in model space
    scenes: Tensor  # [B] scene index
    present: Tensor  # [B] bool
    subject_mask: Tensor  # [B, H, W] bool, both instances
    body: Tensor  # [B, 4] body colour (zeros when absent)
    pattern_colour: Tensor  # [B, 4]
    pattern: Tensor  # [B] pattern index (-1 when absent)
    top: Tensor  # [B, INSTANCES]
    left: Tensor  # [B, INSTANCES]
    side: Tensor  # [B, INSTANCES] (0 when absent)
    body_index: Tensor  # [B] palette index of the body colour (-1 when absent)
    pattern_index: Tensor  # [B] palette index of the pattern colour
    tint: Tensor  # [B] index into tints()


def subject_palette() -> Tensor:
    """[PALETTE, 4]: subject colours, the corners of a cube on channels 1-3, channel 0 at SUBJECT_LEVEL."""
    corners = torch.tensor([[(k >> bit) & 1 for bit in range(3)] for k in range(8)], dtype=torch.float32)
    colours = (corners * 2 - 1) * SUBJECT_COLOUR_RANGE
    return torch.cat([torch.full((8, 1), SUBJECT_LEVEL), colours], dim=1)


def _subject_colours(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Palette indices of the body and pattern colours (always different)."""
    body = torch.randint(0, PALETTE, (count,), generator=generator)
    pattern = (body + torch.randint(1, PALETTE, (count,), generator=generator)) % PALETTE
    return body, pattern


def pattern_mask(kind: int, side: int) -> Tensor:
    """[side, side] bool: where the pattern colour goes inside the subject square."""
    band = max(1, round(side / 3))
    start = (side - band) // 2
    mask = torch.zeros(side, side, dtype=torch.bool)
    if kind == 0:
        mask[start:start + band, :] = True
    elif kind == 1:
        mask[:, start:start + band] = True
    else:
        spot = (side + 1) // 2
        s = (side - spot) // 2
        mask[s:s + spot, s:s + spot] = True
    return mask


def _place(size: int, sides: Tensor, unit: Tensor) -> tuple[list[int], list[int]]:
    """Top-left corners of the instances: the first from its uniform draw, each next one moved along a fixed
    deterministic sequence of candidate spots until it keeps a gap of at least one pixel to the ones before."""
    tops, lefts = [], []
    for index, side in enumerate(sides.tolist()):
        span = size - side + 1
        for attempt in range(64):
            u = (float(unit[index, 0]) + attempt * 0.618034) % 1.0
            v = (float(unit[index, 1]) + attempt * 0.381966) % 1.0
            top, left = int(u * span), int(v * span)
            clear = all(top > t + s or t > top + side or left > lf + s or lf > left + side
                        for t, lf, s in zip(tops, lefts, sides.tolist()[:index], strict=True))
            if clear:
                break
        tops.append(top)
        lefts.append(left)
    return tops, lefts


def generate(count: int, size: int, generator: torch.Generator, scenes: Tensor | None = None,
             present: Tensor | None = None) -> WorldBatch:
    """`count` world images of size x size. Scenes and presence are drawn unless given."""
    spec = WorldSpec(size)
    tiles = scene_tiles()
    if scenes is None:
        scenes = torch.randint(0, len(SCENE_NAMES), (count,), generator=generator)
    if present is None:
        present = torch.rand(count, generator=generator) < SUBJECT_PRESENT_PROBABILITY
    offsets = torch.randint(0, 64, (count, 2), generator=generator)
    low, high = spec.side_range
    sides = torch.randint(low, high + 1, (count, INSTANCES), generator=generator)
    unit = torch.rand(count, INSTANCES, 2, generator=generator)
    patterns = torch.randint(0, len(PATTERN_NAMES), (count,), generator=generator)
    body_index, pattern_index = _subject_colours(count, generator)
    palette = subject_palette()
    body, pattern_colour = palette[body_index], palette[pattern_index]
    tint = torch.randint(0, len(tints()), (count,), generator=generator)
    tint_colours = tints()

    latents = torch.empty(count, CHANNELS, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    tops = torch.zeros(count, INSTANCES, dtype=torch.long)
    lefts = torch.zeros(count, INSTANCES, dtype=torch.long)
    for i in range(count):
        scene = int(scenes[i])
        colour = scene_colour(scene) + tint_colours[tint[i]]
        image = tiled(tiles[scene], size, int(offsets[i, 0]), int(offsets[i, 1])) + colour[:, None, None]
        if present[i]:
            placed_tops, placed_lefts = _place(size, sides[i], unit[i])
            for k in range(INSTANCES):
                side, top, left = int(sides[i, k]), placed_tops[k], placed_lefts[k]
                tops[i, k], lefts[i, k] = top, left
                inner = pattern_mask(int(patterns[i]), side)
                square = torch.where(inner[None], pattern_colour[i][:, None, None], body[i][:, None, None])
                image[:, top:top + side, left:left + side] = square
                masks[i, top:top + side, left:left + side] = True
        latents[i] = image
    absent = ~present
    body = torch.where(absent[:, None], torch.zeros_like(body), body)
    pattern_colour = torch.where(absent[:, None], torch.zeros_like(pattern_colour), pattern_colour)
    return WorldBatch(latents=latents, scenes=scenes, present=present, subject_mask=masks, body=body,
                      pattern_colour=pattern_colour, pattern=torch.where(present, patterns, -1), top=tops,
                      left=lefts, side=torch.where(present[:, None], sides, 0),
                      body_index=torch.where(present, body_index, -1),
                      pattern_index=torch.where(present, pattern_index, -1), tint=tint)
