"""The benchmark's own detector and metrics, computed from latents (generated or from the world).

Detector, per image:
- subject: channel 0 above world.SUBJECT_THRESHOLD; every 4-connected component covering at least half the smallest
  square the world draws is an instance; present if there is one; the largest instance's size (sqrt of area) and
  centre give the pose;
- appearance: the pixels of all instances split into two colours (2-means, median of each cluster's core pixels),
  the larger cluster is the body colour, the smaller the pattern colour; the smaller cluster's extent inside the
  largest instance's bounding box gives the pattern kind;
- scene: background features (mean colour on channels 1-3 and, per scene, the amplitude of that scene's tile at its
  best offset), nearest scene centroid (centroids measured on world samples).

Metrics of one story batch (first `anchors` images are anchors):
- consistency distance: RMS difference of the 8-number appearance (body + pattern colour) between each target and
  each anchor (lower = more consistent); pattern match: share of (target, anchor) pairs with the same pattern kind;
  identity match: share of pairs with the same body colour, pattern colour (nearest palette entries) and pattern
  kind, i.e. the same subject (chance level for independent subjects: 1/168);
- background leakage: how far each target's background moved toward each anchor's scene, the mean of a colour
  part (mean colour along the line between the two scenes' colours) and a texture part (the amplitude of the
  anchor scene's tile, from chance level to full); 0 = no trace of the anchor's scene, 1 = the anchor's scene;
- background distance: RMS difference of the tints of each target's and each anchor's background (the tint is
  random and not prompted, so sharing that pulls it toward the anchors' is leakage); tint match: share of
  (target, anchor) pairs with the same tint (chance: 1/4);
- subject-present rate, scene correctness (predicted scene == prompted scene), pose spread (std of subject
  centres and sizes across the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from . import world

APPEARANCE_DIMS = 8


@dataclass
class Detection:
    present: bool
    area: int
    centre: tuple[float, float]  # (row, column) of the largest instance, as fractions of the image size
    side: float  # sqrt(area) / image size of the largest instance
    body: np.ndarray  # [4]
    pattern_colour: np.ndarray  # [4]
    pattern: int  # index into world.PATTERN_NAMES, -1 when absent
    features: np.ndarray  # scene features
    scene: int  # predicted scene
    instances: int  # separate subject components found
    body_index: int = -1  # nearest palette colour of the body (-1 when absent)
    pattern_index: int = -1
    tint: np.ndarray | None = None  # [3] untextured background colour minus the predicted scene's
    tint_index: int = -1  # nearest of world.tints()

    @property
    def identity(self) -> tuple[int, int, int]:
        """(body colour, pattern colour, pattern kind): equal identities mean the same subject."""
        return self.body_index, self.pattern_index, self.pattern

    @property
    def appearance(self) -> np.ndarray:
        return np.concatenate([self.body, self.pattern_colour])


def _two_means(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-means on [n, 4] colours: (labels, centre of cluster 0, centre of cluster 1), deterministic init."""
    mean = pixels.mean(axis=0)
    first = pixels[np.argmax(((pixels - mean) ** 2).sum(axis=1))]
    second = pixels[np.argmax(((pixels - first) ** 2).sum(axis=1))]
    centres = np.stack([first, second])
    labels = np.zeros(len(pixels), dtype=int)
    for _ in range(20):
        distances = ((pixels[:, None, :] - centres[None]) ** 2).sum(axis=2)
        labels = distances.argmin(axis=1)
        new = np.stack([pixels[labels == k].mean(axis=0) if (labels == k).any() else centres[k] for k in range(2)])
        if np.allclose(new, centres):
            break
        centres = new
    return labels, centres[0], centres[1]


def _core_colour(array: np.ndarray, label_map: np.ndarray, label: int) -> np.ndarray:
    """Median colour of one cluster, from its core pixels (all 4 neighbours in the same cluster) when it has any:
    pixels on a blurred edge mix two colours and would pull the estimate."""
    member = label_map == label
    if not member.any():
        member = label_map >= 0
    core = ndimage.binary_erosion(member, structure=ndimage.generate_binary_structure(2, 1))
    chosen = core if core.sum() >= 2 else member
    return np.median(array[:, chosen], axis=1)


def _nearest_palette(colour: np.ndarray) -> int:
    palette = world.subject_palette().numpy()
    return int(np.argmin(((palette[:, 1:] - colour[None, 1:]) ** 2).sum(axis=1)))


def _pattern_kind(minority: np.ndarray) -> int:
    """Classify the minority colour's layout inside the subject's bounding box [h, w] bool."""
    if not minority.any():
        return 2
    rows = minority.any(axis=1).mean()  # share of the box's rows that hold pattern pixels
    cols = minority.any(axis=0).mean()
    if cols - rows > 0.25:
        return 0  # spans the width: horizontal stripe
    if rows - cols > 0.25:
        return 1
    return 2


@lru_cache(maxsize=8)
def _templates(size: int) -> tuple[Tensor, ...]:
    """Per scene: every shifted copy of its tile over a size x size image, [offsets, 4, size, size]."""
    out = []
    for tile in world.scene_tiles():
        rows, cols = tile.shape[1:]
        out.append(torch.stack([world.tiled(tile, size, oy, ox) for oy in range(rows) for ox in range(cols)]))
    return tuple(out)


def _background_mean(image: Tensor, weight: Tensor) -> Tensor:
    """[4] mean of the pixels weighted by weight [H, W]."""
    return (image * weight).sum(dim=(1, 2)) / weight.sum().clamp(min=1.0)


def _tile_amplitudes(image: Tensor, weight: Tensor, mean: Tensor, templates: Tensor) -> Tensor:
    """[offsets]: least-squares coefficient of each shifted tile in the weighted background's residual."""
    masked = templates * weight
    energy = masked.flatten(1).pow(2).sum(dim=1).clamp(min=1e-8)
    return (masked * ((image - mean[:, None, None]) * weight)).sum(dim=(1, 2, 3)) / energy


def scene_features(image: Tensor, background: Tensor) -> np.ndarray:
    """[mean colour on channels 1-3, per scene: amplitude of that scene's tile] of the background pixels.

    The amplitude is the least-squares coefficient of the tile (at its best offset) in the background's residual:
    1 for a clean image of that scene, near 0 for other scenes, and linear in mixtures (half-way = 0.5).
    """
    weight = background.float()
    mean = _background_mean(image, weight)
    amplitudes = [float(_tile_amplitudes(image, weight, mean, templates).max())
                  for templates in _templates(image.shape[-1])]
    return np.concatenate([mean[1:].numpy(), np.array(amplitudes)])


COLOUR_FEATURES = 3  # the first features are the background's mean colour (channels 1-3)


def untextured_colour(image: Tensor, background: Tensor, scene: int) -> np.ndarray:
    """Mean colour (channels 1-3) of the background pixels once the scene's tile, at its best offset and
    amplitude, is taken out: the part of the colour a partly covered tile would otherwise bias."""
    weight = background.float()
    templates = _templates(image.shape[-1])[scene]
    amplitudes = _tile_amplitudes(image, weight, _background_mean(image, weight), templates)
    best = int(amplitudes.argmax())
    return _background_mean(image - amplitudes[best] * templates[best], weight)[1:].numpy()


class Detector:
    """Detects subjects and scenes in latents of one world size; scene centroids measured on world samples."""

    def __init__(self, size: int, reference_per_scene: int = 40, seed: int = 12345):
        self.size = size
        low, _ = world.WorldSpec(size).side_range
        self.min_area = max(4, (low * low) // 2)
        generator = torch.Generator().manual_seed(seed)
        count = reference_per_scene * len(world.SCENE_NAMES)
        scenes = torch.arange(count) % len(world.SCENE_NAMES)
        reference = world.generate(count, size, generator, scenes=scenes)
        found = [self._features_and_subject(image) for image in reference.latents]
        features = np.stack([item[0] for item in found])
        # Scene centroids of untinted backgrounds: the reference images' known tints are taken out.
        true_tints = world.tints()[reference.tint, 1:].numpy()
        features[:, :COLOUR_FEATURES] -= true_tints
        labels = scenes.numpy()
        scene_count = len(world.SCENE_NAMES)
        self.centroids = np.stack([features[labels == s].mean(axis=0) for s in range(scene_count)])
        # Per scene: the untinted background colour, the origin of tint estimates.
        untextured = np.stack([untextured_colour(image.float(), torch.from_numpy(item[4]), int(scene))
                               for image, item, scene in zip(reference.latents, found, scenes, strict=True)])
        untextured -= true_tints
        self.scene_colours = np.stack([untextured[labels == s].mean(axis=0) for s in range(scene_count)])
        # Per scene: its tile's amplitude on its own images and on other scenes' images (the level of chance).
        amplitudes = features[:, COLOUR_FEATURES:]
        self.own_amplitude = np.array([amplitudes[labels == s, s].mean() for s in range(scene_count)])
        self.chance_amplitude = np.array([amplitudes[labels != s, s].mean() for s in range(scene_count)])

    def _features_and_subject(self, image: Tensor):
        """(scene features, subject mask, largest instance mask, present, background mask)."""
        image = image.float().cpu()
        above = (image[0] > world.SUBJECT_THRESHOLD).numpy()
        labels, count = ndimage.label(above)
        subject = np.zeros_like(above)
        largest = np.zeros_like(above)
        if count:
            sizes = np.asarray(ndimage.sum(above, labels, index=range(1, count + 1)))
            for index in np.nonzero(sizes >= self.min_area)[0]:
                subject |= labels == index + 1
            if sizes.max() >= self.min_area:
                largest = labels == int(np.argmax(sizes)) + 1
        present = bool(subject.any())
        # The background excludes the subject and a one-pixel ring around it (blurred edges are neither).
        background = ~ndimage.binary_dilation(subject | above, iterations=1)
        if background.sum() < 8:
            background = ~subject
        return scene_features(image, torch.from_numpy(background)), subject, largest, present, background

    def detect(self, image: Tensor) -> Detection:
        features, subject, largest, present, background = self._features_and_subject(image)
        scene = int(np.argmin(((self.centroids - features) ** 2).sum(axis=1)))
        colour = untextured_colour(image.float().cpu(), torch.from_numpy(background), scene)
        tint = colour - self.scene_colours[scene]
        tint_index = int(np.argmin(((world.tints()[:, 1:].numpy() - tint) ** 2).sum(axis=1)))
        if not present:
            empty = np.zeros(4)
            return Detection(False, 0, (math.nan, math.nan), 0.0, empty, empty, -1, features, scene, 0,
                             tint=tint, tint_index=tint_index)
        array = image.float().cpu().numpy()
        pixels = array[:, subject].T  # [n, 4], every instance: they share one appearance
        labels, _, _ = _two_means(pixels)
        body_label = 0 if (labels == 0).sum() >= (labels == 1).sum() else 1
        rows, cols = np.nonzero(subject)
        label_map = np.full(subject.shape, -1)
        label_map[rows, cols] = labels
        body = _core_colour(array, label_map, body_label)
        pattern_colour = _core_colour(array, label_map, 1 - body_label)
        # Pose and pattern kind from the largest instance.
        rows, cols = np.nonzero(largest)
        top, left = rows.min(), cols.min()
        box = np.zeros((rows.max() - top + 1, cols.max() - left + 1), dtype=bool)
        minority = (label_map[rows, cols] != body_label)
        box[rows[minority] - top, cols[minority] - left] = True
        area = int(largest.sum())
        centre = (float(rows.mean() + 0.5) / self.size, float(cols.mean() + 0.5) / self.size)
        instances = int(ndimage.label(subject)[1])
        return Detection(True, area, centre, math.sqrt(area) / self.size, body, pattern_colour, _pattern_kind(box),
                         features, scene, instances, _nearest_palette(body), _nearest_palette(pattern_colour),
                         tint=tint, tint_index=tint_index)

    def detect_batch(self, latents: Tensor) -> list[Detection]:
        return [self.detect(image) for image in latents]

    def leakage_parts(self, detection: Detection, own_scene: int, other_scene: int) -> tuple[float, float]:
        """(colour, texture): how far the background moved toward the other scene, each 0 = not at all, 1 = fully.

        colour: the background's mean colour projected on the line from the own scene's colour to the other's;
        texture: the other scene's tile amplitude, from its chance level (0) to its level on its own images (1).
        Neither counts a background that is merely a weak copy of its own scene (an imperfect model) as leakage.
        """
        own = self.centroids[own_scene, :COLOUR_FEATURES]
        direction = self.centroids[other_scene, :COLOUR_FEATURES] - own
        colour = float(np.dot(detection.features[:COLOUR_FEATURES] - own, direction) / np.dot(direction, direction))
        amplitude = detection.features[COLOUR_FEATURES + other_scene]
        chance, full = self.chance_amplitude[other_scene], self.own_amplitude[other_scene]
        return colour, float((amplitude - chance) / (full - chance))

    def leakage(self, detection: Detection, own_scene: int, other_scene: int) -> float:
        """Mean of the colour and texture parts of leakage_parts."""
        return float(np.mean(self.leakage_parts(detection, own_scene, other_scene)))


def appearance_distance(a: Detection, b: Detection) -> float:
    """RMS difference of the 8-number appearance (body colour, pattern colour)."""
    return float(np.sqrt(np.mean((a.appearance - b.appearance) ** 2)))


def background_distance(a: Detection, b: Detection) -> float:
    """RMS difference of the two backgrounds' tints (their colour apart from what the scene sets)."""
    return float(np.sqrt(np.mean((a.tint - b.tint) ** 2)))


def _nanmean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def story_metrics(detector: Detector, latents: Tensor, scenes: list[int], anchors: int) -> dict[str, float]:
    """Metrics of one story batch whose images all prompt the subject; the first `anchors` are anchors."""
    detections = detector.detect_batch(latents)
    anchor_ids = range(anchors)
    target_ids = range(anchors, len(detections))
    distances, pattern_matches, identity_matches, leaks = [], [], [], []
    background_distances, tint_matches = [], []
    for t in target_ids:
        for a in anchor_ids:
            background_distances.append(background_distance(detections[t], detections[a]))
            tint_matches.append(float(detections[t].tint_index == detections[a].tint_index))
            if detections[t].present and detections[a].present:
                distances.append(appearance_distance(detections[t], detections[a]))
                pattern_matches.append(float(detections[t].pattern == detections[a].pattern))
                identity_matches.append(float(detections[t].identity == detections[a].identity))
            if scenes[a] != scenes[t]:
                leaks.append(detector.leakage_parts(detections[t], scenes[t], scenes[a]))
    found = [d for d in detections if d.present]
    centres = np.array([d.centre for d in found]) if found else np.zeros((0, 2))
    return {
        "consistency_distance": _nanmean(distances),
        "pattern_match": _nanmean(pattern_matches),
        "identity_match": _nanmean(identity_matches),
        "leakage": _nanmean([float(np.mean(parts)) for parts in leaks]),
        "leakage_colour": _nanmean([parts[0] for parts in leaks]),
        "leakage_texture": _nanmean([parts[1] for parts in leaks]),
        "background_distance": _nanmean(background_distances),
        "tint_match": _nanmean(tint_matches),
        "present_rate": len(found) / len(detections),
        "scene_correct": float(np.mean([d.scene == s for d, s in zip(detections, scenes, strict=True)])),
        "pose_spread": float(np.sqrt(centres.var(axis=0).sum())) if len(found) > 1 else math.nan,
        "size_spread": float(np.std([d.side for d in found])) if len(found) > 1 else math.nan,
    }


def validate(detector: Detector, batch: world.WorldBatch) -> dict[str, float]:
    """How well the detector recovers the ground truth of world samples."""
    detections = detector.detect_batch(batch.latents)
    present = batch.present.numpy()
    found = np.array([d.present for d in detections])
    scene_ok = np.array([d.scene == int(s) for d, s in zip(detections, batch.scenes, strict=True)])
    tint_ok = np.array([d.tint_index == int(t) for d, t in zip(detections, batch.tint, strict=True)])
    colour_errors, pattern_ok, palette_ok, centre_errors, ious = [], [], [], [], []
    for i in np.nonzero(present & found)[0]:
        d = detections[i]
        truth = np.concatenate([batch.body[i].numpy(), batch.pattern_colour[i].numpy()])
        colour_errors.append(float(np.sqrt(np.mean((d.appearance - truth) ** 2))))
        pattern_ok.append(d.pattern == int(batch.pattern[i]))
        palette_ok.append(d.body_index == int(batch.body_index[i]) and d.pattern_index == int(batch.pattern_index[i]))
        centres = [((int(batch.top[i, k]) + int(batch.side[i, k]) / 2) / detector.size,
                    (int(batch.left[i, k]) + int(batch.side[i, k]) / 2) / detector.size)
                   for k in range(batch.side.shape[1])]
        centre_errors.append(min(math.dist(d.centre, c) for c in centres))
        mask = detector._features_and_subject(batch.latents[i])[1]
        truth_mask = batch.subject_mask[i].numpy()
        ious.append(float((mask & truth_mask).sum() / max(1, (mask | truth_mask).sum())))
    return {
        "presence_accuracy": float(np.mean(found == present)),
        "scene_accuracy": float(scene_ok.mean()),
        "tint_accuracy": float(tint_ok.mean()),
        "appearance_rms_error": _nanmean(colour_errors),
        "pattern_accuracy": _nanmean([float(x) for x in pattern_ok]),
        "palette_accuracy": _nanmean([float(x) for x in palette_ok]),
        "centre_error": _nanmean(centre_errors),
        "mask_iou": _nanmean(ious),
    }
