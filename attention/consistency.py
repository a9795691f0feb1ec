"""Consistency scores from image embeddings (METHOD.md section 6), in plain torch.

Embeddings are compared by cosine similarity. The anchors' "mean embedding" is the mean of their L2-normalised
embeddings (each anchor weighs the same whatever its embedding's length); a cosine with it equals the cosine with
its direction. The same holds for the reference images' mean.

Which rows count: a sheet assembled from several sampler runs holds each anchor once per run (every run replays
the anchors). `scene_of_row` maps every row of the batch to its scene; rows of one scene after its first are
replays, and only the first is scored, so a replayed anchor neither counts twice in the anchors' mean nor pairs
with itself in the pairwise mean.

Masks: a subject mask m (1 = subject, 0 = background, soft values blend) turns each image into
m * image + (1 - m) * fill, with one fill colour for every image (the encoder's mean input colour, so the
background becomes the encoder's neutral input). Two images whose subjects agree then give identical inputs
whatever their backgrounds were: the backgrounds are averaged out of the score.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def normalized(embeddings: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float64 on the CPU (an all-zero row stays zero). Embeddings are small, and
    devices such as Apple MPS have no float64."""
    embeddings = embeddings.detach().to("cpu", torch.float64).flatten(1)
    return embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-300)


def mean_direction(embeddings: Tensor) -> Tensor:
    """The mean of the normalised rows: what 'the mean embedding' of several images means here."""
    return normalized(embeddings).mean(dim=0)


def cosine_to(embeddings: Tensor, target: Tensor) -> Tensor:
    """Cosine similarity of every row with one vector; 0 where either is all zero."""
    target = target.detach().to("cpu", torch.float64).flatten()
    target = target / target.norm().clamp_min(1e-300)
    return normalized(embeddings) @ target


def cosine_pairs(first: Tensor, second: Tensor) -> Tensor:
    """Cosine similarity of row i of `first` with row i of `second` (e.g. an image and its own prompt)."""
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"{first.shape[0]} rows against {second.shape[0]}")
    return (normalized(first) * normalized(second)).sum(dim=1)


def pairwise_mean(embeddings: Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows (CLIP-I style); NaN for fewer than two rows."""
    count = embeddings.shape[0]
    if count < 2:
        return float("nan")
    unit = normalized(embeddings)
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (count * (count - 1)))


def first_rows(scene_of_row: Sequence[Hashable]) -> list[int]:
    """The row index of each scene's first occurrence, in row order (later rows of a scene are replays)."""
    seen: set[Hashable] = set()
    rows = []
    for row, scene in enumerate(scene_of_row):
        if scene not in seen:
            seen.add(scene)
            rows.append(row)
    return rows


def mask_images(images: Tensor, masks: Tensor, fill: Sequence[float]) -> Tensor:
    """IMAGE [B, H, W, C] with every pixel blended towards `fill` by (1 - mask); masks [B, h, w] in [0, 1].

    Masks of another size are resized to the images' size by nearest neighbour (a hard mask stays hard, so no
    background pixel leaks in at its edge); values are clamped to [0, 1].
    """
    if masks.ndim != 3 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks must be [B, h, w] with B = {images.shape[0]}, got {tuple(masks.shape)}")
    masks = masks.to(device=images.device, dtype=torch.float32)
    if masks.shape[1:] != images.shape[1:3]:
        masks = torch.nn.functional.interpolate(masks.unsqueeze(1), size=tuple(images.shape[1:3]),
                                                mode="nearest-exact").squeeze(1)
    weight = masks.clamp(0.0, 1.0).unsqueeze(-1).to(images.dtype)
    channels = images.shape[-1]
    colour = torch.tensor(list(fill)[:channels] + [1.0] * max(0, channels - len(fill)), dtype=images.dtype,
                          device=images.device)
    return images * weight + colour * (1.0 - weight)


@dataclass(frozen=True)
class Consistency:
    """The scores of one sheet. Per-row lists have one entry per row of the batch (replays included).

    similarity[r]: row r's cosine with what targets are compared with (the anchors' mean, or the reference's);
    for an anchor in anchor mode, with the mean of the OTHER anchors (NaN when it is the only anchor), so an
    anchor is never compared with itself. counted[r]: False for a replay (a later row of an already seen scene).
    """

    score: float  # mean similarity of the counted targets
    pairwise: float  # mean pairwise cosine of the counted rows, anchors included
    similarity: tuple[float, ...]
    is_anchor: tuple[bool, ...]
    counted: tuple[bool, ...]
    compared_with: str  # "anchors" or "reference"


def consistency(embeddings: Tensor, anchor_count: int, reference: Tensor | None = None,
                scene_of_row: Sequence[Hashable] | None = None,
                anchor_of_row: Sequence[bool] | None = None) -> Consistency:
    """Score a sheet from its rows' embeddings [B, D].

    scene_of_row names what each row shows (default: row r is scene r); rows with a name seen before are replays.
    Anchors are the rows anchor_of_row marks, by default those whose scene number is below anchor_count; the
    others are targets. Targets are compared with the mean of the counted anchors, or with the mean of
    `reference` [R, D] when given (the anchors are then only part of the pairwise mean). Raises ValueError for a
    layout with no target, or no anchor and no reference.
    """
    rows = embeddings.shape[0]
    scenes = list(range(rows)) if scene_of_row is None else list(scene_of_row)
    if len(scenes) != rows or (anchor_of_row is not None and len(anchor_of_row) != rows):
        raise ValueError(f"scene_of_row / anchor_of_row do not have one entry for each of the {rows} rows")
    counted_rows = first_rows(scenes)
    counted = [False] * rows
    for row in counted_rows:
        counted[row] = True
    is_anchor = ([scene < anchor_count for scene in scenes] if anchor_of_row is None
                 else [bool(flag) for flag in anchor_of_row])
    anchors = [row for row in counted_rows if is_anchor[row]]
    targets = [row for row in counted_rows if not is_anchor[row]]
    if not targets:
        raise ValueError(f"no target: all {len(counted_rows)} distinct images are among the {anchor_count} anchors")
    unit = normalized(embeddings)
    similarity = torch.full((rows,), float("nan"), dtype=torch.float64)
    if reference is not None:
        if reference.shape[0] == 0:
            raise ValueError("the reference holds no image")
        centre = mean_direction(reference.to(unit.device))
        similarity = cosine_to(unit, centre)
        compared_with = "reference"
    else:
        if not anchors:
            raise ValueError("no anchor and no reference: nothing to compare the targets with")
        centre = unit[anchors].mean(dim=0)
        similarity = cosine_to(unit, centre)
        for row in range(rows):
            if is_anchor[row]:
                others = [anchor for anchor in anchors if scenes[anchor] != scenes[row]]
                similarity[row] = cosine_to(unit[row:row + 1], unit[others].mean(dim=0))[0] if others else float("nan")
        compared_with = "anchors"
    score = float(similarity[targets].mean())
    return Consistency(score=score, pairwise=pairwise_mean(unit[counted_rows]),
                       similarity=tuple(float(value) for value in similarity), is_anchor=tuple(is_anchor),
                       counted=tuple(counted), compared_with=compared_with)
