"""Dense correspondences between the images of a batch, from diffusion features (docs/method.md section 2).

ConsiStory's feature injection needs, for every token p of image i, the token of another image whose content
matches it. The features are "DIFT" features: one feature map per image, taken from the UNet decoder and smoothed
with a 3x3 Gaussian (sigma 1) so single noisy tokens do not decide a match.

For image i and each mapped source j (targets <- every anchor; an anchor <- every other anchor; targets are never
sources), the nearest neighbour of p among j's subject tokens by cosine distance; then, per token, the best source
j* (ties go to the earlier anchor). The best distances of one image are split with Otsu; the injected tokens are
those inside i's own subject mask and in the lower (better matched) class.

Without subject masks (the mask-free spectral setting) every token counts as subject: a source offers all its
tokens, and the injected tokens are the Otsu lower class alone, i.e. the tokens that found a clearly better match
than the rest of their image. Background that has a good counterpart in an anchor is then injected too; that is
the same leakage trade-off the spectral variant accepts for sharing.

Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import otsu_threshold

Grid = tuple[int, int]

GAUSSIAN_SIGMA = 1.0
# Rows of the query side per similarity block: bounds the block to QUERY_CHUNK x (source tokens) floats
# (16 MiB for SDXL's 4096-token grid) however large the image.
QUERY_CHUNK = 1024
# Best distances of one image that all lie within this spread are one class (no Otsu split): a copy of an anchor
# matches everywhere at distance ~0, and splitting float32 rounding noise in two would inject half of it at random.
FLAT_SPREAD = 1e-6
# Cosine of two zero vectors is defined as 0 (distance 1), not NaN.
_NORM_EPS = 1e-12


def gaussian_kernel(sigma: float = GAUSSIAN_SIGMA, size: int = 3) -> Tensor:
    """The normalised size x size Gaussian kernel (float32)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(weights, weights)
    return (kernel / kernel.sum()).float()


def smooth_features(features: Tensor, sigma: float = GAUSSIAN_SIGMA) -> Tensor:
    """Each channel of features [B, C, H, W] blurred with a 3x3 Gaussian, in float32.

    Borders replicate the edge (a zero border would pull edge tokens toward zero and bias their cosines).
    """
    batch, channels, height, width = features.shape
    kernel = gaussian_kernel(sigma).to(features.device).expand(channels, 1, 3, 3)
    padded = F.pad(features.float(), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels)


def feature_tokens(features: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H * W, C], tokens in the row-major order of the attention layers."""
    return features.flatten(2).transpose(1, 2)


def correspondence_sources(image: int, anchor_count: int) -> list[int]:
    """The images `image` takes matches from: every anchor other than itself (targets are never sources)."""
    return [anchor for anchor in range(anchor_count) if anchor != image]


def nearest_neighbours(queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """For each query [N, C], the nearest key [M, C] by cosine distance: (distance [N], key index [N]).

    Distance = 1 - cosine similarity, in [0, 2]. Ties go to the lowest key index.
    """
    if keys.shape[0] == 0:
        raise ValueError("nearest_neighbours needs at least one key")
    unit_keys = F.normalize(keys.float(), dim=-1, eps=_NORM_EPS)
    distances, indices = [], []
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        unit_queries = F.normalize(queries[start:start + QUERY_CHUNK].float(), dim=-1, eps=_NORM_EPS)
        similarity, index = (unit_queries @ unit_keys.T).max(dim=-1)
        distances.append(1.0 - similarity)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def distance_threshold(distances: Tensor, float64: bool | None = None) -> Tensor:
    """Otsu threshold of each row of best distances [B, N] (finite entries only); +inf where a row has no split.

    A row whose finite values all lie within FLAT_SPREAD has one class, so every token of it is under the threshold.
    float64: Otsu in float64 (None: when the device has it), as for masks.otsu_threshold.
    """
    thresholds = []
    for row in distances:
        finite = row[torch.isfinite(row)]
        if finite.numel() == 0:
            thresholds.append(torch.tensor(-math.inf, device=row.device))
        elif float(finite.max() - finite.min()) <= FLAT_SPREAD:
            thresholds.append(torch.tensor(math.inf, device=row.device))
        else:
            thresholds.append(otsu_threshold(finite, float64).to(row.device))
    return torch.stack(thresholds).to(distances.dtype)


@dataclass(frozen=True)
class Correspondence:
    """Per image and token: the matched source image and token, the cosine distance, and whether it is injected.

    source_image [B, N] long (-1: no source), source_token [B, N] long, distance [B, N] float32 (inf: no source),
    threshold [B] float32, injected [B, N] bool. Tokens are row-major on `grid`.
    """

    grid: Grid
    source_image: Tensor
    source_token: Tensor
    distance: Tensor
    threshold: Tensor
    injected: Tensor

    @property
    def image_count(self) -> int:
        return self.source_image.shape[0]

    @property
    def token_count(self) -> int:
        return self.source_image.shape[1]


def dense_correspondence(features: Tensor, anchor_count: int, subject_masks: Tensor | None = None,
                         float64: bool | None = None) -> Correspondence:
    """Correspondences of a batch from its feature maps [B, C, H, W] (already smoothed).

    subject_masks: [B, H * W] bool, or None for the mask-free setting (every token is subject).
    The first min(anchor_count, B) images are anchors. float64: as for distance_threshold.
    """
    batch, _, height, width = features.shape
    tokens = feature_tokens(features.float())
    token_count = height * width
    device = features.device
    anchors = max(0, min(anchor_count, batch))
    if subject_masks is None:
        masks = torch.ones(batch, token_count, dtype=torch.bool, device=device)
    else:
        if tuple(subject_masks.shape) != (batch, token_count):
            raise ValueError(f"subject masks of shape {tuple(subject_masks.shape)} for {batch} images of "
                             f"{token_count} tokens")
        masks = subject_masks.to(device=device, dtype=torch.bool)
    subject_index = [masks[image].nonzero().flatten() for image in range(batch)]

    source_image = torch.full((batch, token_count), -1, dtype=torch.long, device=device)
    source_token = torch.zeros(batch, token_count, dtype=torch.long, device=device)
    distance = torch.full((batch, token_count), math.inf, dtype=torch.float32, device=device)
    for image in range(batch):
        sources = [j for j in correspondence_sources(image, anchors) if subject_index[j].numel()]
        if not sources:
            continue
        per_source = [nearest_neighbours(tokens[image], tokens[j, subject_index[j]]) for j in sources]
        distances = torch.stack([d for d, _ in per_source])  # [S, N]
        best_distance, best = distances.min(dim=0)  # ties: the first (earliest) source
        matched = torch.stack([subject_index[j][index] for j, (_, index) in zip(sources, per_source, strict=True)])
        source_image[image] = torch.as_tensor(sources, device=device)[best]
        source_token[image] = matched.gather(0, best[None]).squeeze(0)
        distance[image] = best_distance
    threshold = distance_threshold(distance, float64)
    injected = (distance <= threshold[:, None]) & masks & (source_image >= 0)
    return Correspondence(grid=(height, width), source_image=source_image, source_token=source_token,
                          distance=distance, threshold=threshold, injected=injected)
