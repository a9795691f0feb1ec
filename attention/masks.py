"""Subject masks from cross-attention, with mask dropout (ConsiStory's masked sharing, docs/method.md section 2).

For the subject word's token(s) the cross-attention probabilities are averaged over heads, over the layers of the
coarsest attention grid and over the last up-to-20 steps; the averaged map is upsampled to each layer's grid,
thresholded with Otsu per image and token, and the tokens' masks are united. Each step a random fraction of each
anchor's subject tokens is dropped (deterministic given a seed, redrawn every step, the same for every layer of
one grid size). Anchors then contribute only their kept subject tokens to other images.

Timing: the mask used during step i comes from the steps before i, so every layer of a step (encoder layers run
before the coarsest cross-attention layers) sees the same mask. Until one step has been read completely (only
possible when sharing starts at step 0), there is no mask and anchors contribute all their tokens.

Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .device import exact_dtype

Grid = tuple[int, int]

# ConsiStory averages the cross-attention of the last (up to) 20 steps.
HISTORY_STEPS = 20
# Mixes (seed, step, grid) into one generator seed; any fixed odd multiplier works, it only has to be stable.
_SEED_MULTIPLIER = 1_000_003
_SEED_MODULUS = 2**63 - 1


def pad_token_positions(subject_tokens: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Ragged per-image token positions as (index [B, S] long, valid [B, S] bool); padding points at token 0."""
    width = max((len(tokens) for tokens in subject_tokens), default=0)
    index = torch.zeros(len(subject_tokens), max(width, 1), dtype=torch.long)
    valid = torch.zeros(len(subject_tokens), max(width, 1), dtype=torch.bool)
    for row, tokens in enumerate(subject_tokens):
        if tokens:
            index[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
            valid[row, : len(tokens)] = True
    return index, valid


def subject_token_probabilities(q: Tensor, k: Tensor, heads: int, token_index: Tensor) -> Tensor:
    """Cross-attention probabilities of chosen context tokens, averaged over heads.

    q: [B, N, C] projected queries of the image tokens; k: [B, T, C] projected keys of the context tokens;
    token_index: [B, S] positions in the context. Returns [B, S, N] in float32. The softmax runs over all T
    context tokens, as in the layer itself, before the chosen columns are taken.
    """
    batch, tokens, channels = q.shape
    head_dim = channels // heads
    q_heads = q.float().reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    k_heads = k.float().reshape(batch, k.shape[1], heads, head_dim).transpose(1, 2)
    probabilities = torch.softmax((q_heads @ k_heads.transpose(-1, -2)) * head_dim**-0.5, dim=-1).mean(1)
    chosen = probabilities.gather(-1, token_index.to(q.device)[:, None, :].expand(-1, tokens, -1))
    return chosen.transpose(1, 2).contiguous()


def upsample_maps(maps: Tensor, source: Grid, target: Grid) -> Tensor:
    """Maps [..., Hs * Ws] on the source grid, bilinearly resized to [..., Ht * Wt] (any aspect ratio)."""
    if tuple(source) == tuple(target):
        return maps
    lead = maps.shape[:-1]
    images = maps.reshape(-1, 1, source[0], source[1])
    resized = F.interpolate(images, size=tuple(target), mode="bilinear", align_corners=False)
    return resized.reshape(*lead, target[0] * target[1])


def otsu_threshold(values: Tensor, float64: bool | None = None) -> Tensor:
    """Otsu's threshold of each row of values [..., M]: the split maximising the between-class variance.

    Exact (no histogram): every split between two distinct sorted values is tried. Returns the largest value of
    the lower class, so `values > threshold` is the upper class. A row without two distinct values has no split;
    its threshold is +inf (an empty upper class).

    float64: work in float64 (None: when the device has it; Apple MPS does not). The float32 path computes the
    same definition; both sides' sums come from their own cumulative sums, so no class mean is a difference of
    two large sums.
    """
    dtype = exact_dtype(values.device, float64)
    ordered = values.to(dtype).sort(dim=-1).values
    count = ordered.shape[-1]
    if count < 2:
        return torch.full(values.shape[:-1], float("inf"), dtype=values.dtype, device=values.device)
    lower_sums = ordered.cumsum(-1)[..., :-1]
    upper_sums = ordered.flip(-1).cumsum(-1).flip(-1)[..., 1:]
    lower_sizes = torch.arange(1, count, dtype=dtype, device=values.device)
    lower_mean = lower_sums / lower_sizes
    upper_mean = upper_sums / (count - lower_sizes)
    between = lower_sizes * (count - lower_sizes) * (lower_mean - upper_mean) ** 2
    # A split inside a run of equal values cannot be realised by a threshold.
    between = torch.where(ordered[..., 1:] > ordered[..., :-1], between, torch.full_like(between, -1.0))
    best = between.argmax(-1, keepdim=True)
    threshold = ordered.gather(-1, best).squeeze(-1)
    has_split = (between.amax(-1) >= 0)
    threshold = torch.where(has_split, threshold, torch.full_like(threshold, float("inf")))
    return threshold.to(values.dtype)


def otsu_foreground(values: Tensor, float64: bool | None = None) -> Tensor:
    """The upper Otsu class of each row of values [..., M], as a bool mask of the same shape."""
    return values > otsu_threshold(values, float64).unsqueeze(-1)


def subject_masks(maps: Tensor, valid: Tensor, source: Grid, target: Grid, float64: bool | None = None) -> Tensor:
    """Per-image subject masks [B, Ht * Wt] from averaged maps [B, S, Hs * Ws] of S subject tokens.

    Each token's map is upsampled to the target grid and Otsu-thresholded per image; the tokens are united.
    float64: as for otsu_threshold.
    """
    foreground = otsu_foreground(upsample_maps(maps.float(), source, target), float64)
    return (foreground & valid.to(foreground.device)[..., None]).any(1)


def dropout_seed(seed: int, step: int, grid: Grid) -> int:
    """One generator seed per (seed, step, grid size): redrawn every step, shared by the layers of a grid."""
    mixed = int(seed) % _SEED_MODULUS
    for part in (step, grid[0], grid[1]):
        mixed = (mixed * _SEED_MULTIPLIER + int(part) + 1) % _SEED_MODULUS
    return mixed


def drop_tokens(indices: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Keep all but round(fraction * count) of the indices, chosen at random; kept indices stay sorted."""
    count = indices.numel()
    dropped = min(count, int(fraction * count + 0.5))
    if dropped == 0:
        return indices
    order = torch.randperm(count, generator=generator)
    kept = indices.cpu()[order[dropped:]]
    return kept.sort().values.to(indices.device)


def anchor_subject_tokens(masks: Tensor, anchors: int, fraction: float, seed: int, step: int,
                          grid: Grid) -> list[Tensor]:
    """Token indices each of the first `anchors` images contributes to others: its mask minus the dropout."""
    generator = torch.Generator().manual_seed(dropout_seed(seed, step, grid))
    return [drop_tokens(masks[a].nonzero().flatten(), fraction, generator) for a in range(anchors)]


class SubjectMaskHistory:
    """Per-run mask state: per-step maps of the coarsest grid (the last HISTORY_STEPS only) and per-step caches.

    record() adds the subject maps of one cross-attention layer on the coarsest grid; calls of one step
    (several layers, several model calls of one step) are averaged into that step's map. anchor_keep() gives the
    masked, dropped-out token indices of the anchors for a step and a grid, computed once per (step, grid) from
    the steps before it.
    """

    def __init__(self, subject_tokens: Sequence[Sequence[int]], dropout: float, seed: int,
                 history_steps: int = HISTORY_STEPS, float64: bool | None = None) -> None:
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"mask dropout must be between 0 and 1, got {dropout!r}")
        self.token_index, self.valid = pad_token_positions(subject_tokens)
        self.dropout = float(dropout)
        self.seed = int(seed)
        self.float64 = float64  # Otsu's precision; None: float64 where the device has it
        self.source_grid: Grid | None = None
        self._history: deque[Tensor] = deque(maxlen=history_steps)
        self._open_step: int | None = None
        self._open_sum: Tensor | None = None
        self._open_layers = 0
        self._cache_step: int | None = None
        self._mask_cache: dict[Grid, Tensor] = {}
        self._keep_cache: dict[tuple[Grid, int], list[Tensor]] = {}

    @property
    def image_count(self) -> int:
        return self.token_index.shape[0]

    def record(self, step: int, maps: Tensor, grid: Grid) -> None:
        """Add one layer's subject maps [B, S, N] (N = grid height x width) read during `step`."""
        if tuple(grid) != self.source_grid:
            # First maps, or the coarsest grid changed mid-run (Deep Shrink's window ended): maps of two grids do
            # not average, so the history starts again on the new grid. Until one of its steps closes, anchors
            # share all their tokens, as before the first mask.
            self.source_grid = tuple(grid)
            self._history.clear()
            self._open_step, self._open_sum, self._open_layers = None, None, 0
        self._close_steps_before(step)
        if self._open_step is None:
            self._open_step, self._open_sum, self._open_layers = step, maps.float().clone(), 1
        else:
            self._open_sum += maps.float()
            self._open_layers += 1

    def averaged_maps(self, step: int) -> Tensor | None:
        """The subject maps [B, S, N] averaged over the (up to HISTORY_STEPS) steps before `step`, or None."""
        self._close_steps_before(step)
        if not self._history:
            return None
        return torch.stack(tuple(self._history)).mean(0)

    def masks(self, step: int, grid: Grid) -> Tensor | None:
        """Subject masks [B, H * W] of every image for use during `step`, or None before the first mask exists."""
        self._start_cache(step)
        grid = tuple(grid)
        if grid not in self._mask_cache:
            averaged = self.averaged_maps(step)
            if averaged is None:
                return None
            self._mask_cache[grid] = subject_masks(averaged, self.valid, self.source_grid, grid, self.float64)
        return self._mask_cache[grid]

    def anchor_keep(self, step: int, grid: Grid, anchors: int) -> list[Tensor] | None:
        """Per-anchor token indices (mask minus dropout) for `step` on `grid`, or None: then all tokens count."""
        self._start_cache(step)
        key = (tuple(grid), anchors)
        if key not in self._keep_cache:
            masks = self.masks(step, grid)
            if masks is None:
                return None
            if anchors > masks.shape[0]:
                raise ValueError(f"{anchors} anchors but subject masks for {masks.shape[0]} images")
            self._keep_cache[key] = anchor_subject_tokens(masks, anchors, self.dropout, self.seed, step, tuple(grid))
        return self._keep_cache[key]

    def _close_steps_before(self, step: int) -> None:
        if self._open_step is not None and self._open_step < step:
            self._history.append(self._open_sum / self._open_layers)
            self._open_step, self._open_sum, self._open_layers = None, None, 0

    def _start_cache(self, step: int) -> None:
        # Only the current step's masks are kept: memory stays flat however long the run is.
        if self._cache_step != step:
            self._cache_step = step
            self._mask_cache.clear()
            self._keep_cache.clear()
