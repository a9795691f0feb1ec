"""Anchor-shared extended self-attention (docs/method.md section 1).

Within one cond or uncond chunk of B images, the first A are anchors. Every image attends to its own tokens
plus the tokens of every anchor other than itself: an anchor therefore sees all anchors, a target sees itself
and all anchors, and no image ever sees a target other than itself. Anchors thus never depend on targets.

Everything here is plain PyTorch. The attention kernel is passed in (`attend`), so the caller can hand over
ComfyUI's optimized_attention and the user's backend (xformers, sage, pytorch) is honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# attend(q [n, Tq, C], k [n, Tk, C], v [n, Tk, C]) -> [n, Tq, C]; heads are the kernel's business.
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# A spectrum filter: [n, T, C] -> [n, T, C]; applied to the anchors' contribution to other images only.
MatrixFilter = Callable[[Tensor], Tensor]
# Both filters at once: (anchor keys, anchor values) [n, T, C] each -> both filtered, so that one batched
# decomposition can serve all anchors, chunks, K and V of a layer call.
PairFilter = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def anchor_count_in_chunk(anchor_count: int, images_per_chunk: int) -> int:
    """More anchors than images simply makes every image an anchor."""
    return max(0, min(anchor_count, images_per_chunk))


def shared_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_count: int,
    anchor_count: int,
    attend: AttendFn,
    key_filter: MatrixFilter | None = None,
    value_filter: MatrixFilter | None = None,
    anchor_keep: Sequence[Tensor] | None = None,
    pair_filter: PairFilter | None = None,
) -> Tensor:
    """Extended self-attention over a batch of `chunk_count` chunks laid out one after another.

    q, k, v: [chunk_count * B, N, C], projected, heads not split.
    key_filter / value_filter: applied once per anchor (and chunk) to the K / V that other images see;
        an image's own K / V, anchors' included, are never filtered.
    pair_filter: filters the anchors' K and V together (used instead of key_filter / value_filter).
    anchor_keep: optional per-anchor LongTensor of token indices an anchor contributes to OTHER images
        (subject masks); the same for every chunk, since the cond chunk's mask serves both.
    """
    total, tokens, channels = q.shape
    if total % chunk_count:
        raise ValueError(f"batch of {total} does not split into {chunk_count} chunks")
    per_chunk = total // chunk_count
    anchors = anchor_count_in_chunk(anchor_count, per_chunk)
    if anchors == 0 or (anchors == 1 and per_chunk == 1):
        return attend(q, k, v)

    def chunked(x: Tensor) -> Tensor:
        return x.reshape(chunk_count, per_chunk, tokens, channels)

    q4, k4, v4 = chunked(q), chunked(k), chunked(v)
    if pair_filter is not None:
        shared_k, shared_v = _pair_contribution(k4[:, :anchors], v4[:, :anchors], pair_filter)
    else:
        shared_k = _anchor_contribution(k4[:, :anchors], key_filter)
        shared_v = _anchor_contribution(v4[:, :anchors], value_filter)
    if anchor_keep is not None:
        if len(anchor_keep) != anchors:
            raise ValueError(f"anchor_keep has {len(anchor_keep)} entries for {anchors} anchors")
        keep = [index.to(q.device) for index in anchor_keep]
        shared_k_parts = [shared_k[:, a].index_select(1, keep[a]) for a in range(anchors)]
        shared_v_parts = [shared_v[:, a].index_select(1, keep[a]) for a in range(anchors)]
    else:
        shared_k_parts = [shared_k[:, a] for a in range(anchors)]
        shared_v_parts = [shared_v[:, a] for a in range(anchors)]

    out = torch.empty_like(q4)
    # Anchor i: its own tokens, then the other anchors' shared tokens. Lengths differ per anchor when masks
    # select different token counts, so anchors are attended one at a time (A is small; batch over chunks).
    for i in range(anchors):
        others = [a for a in range(anchors) if a != i]
        ext_k = torch.cat([k4[:, i]] + [shared_k_parts[a] for a in others], dim=1)
        ext_v = torch.cat([v4[:, i]] + [shared_v_parts[a] for a in others], dim=1)
        out[:, i] = attend(q4[:, i], ext_k, ext_v)

    targets = per_chunk - anchors
    if targets:
        # Every target sees the same anchor tokens: build them once per chunk and broadcast over targets.
        anchor_k = torch.cat(shared_k_parts, dim=1).unsqueeze(1).expand(-1, targets, -1, -1)
        anchor_v = torch.cat(shared_v_parts, dim=1).unsqueeze(1).expand(-1, targets, -1, -1)
        ext_k = torch.cat([k4[:, anchors:], anchor_k], dim=2).reshape(chunk_count * targets, -1, channels)
        ext_v = torch.cat([v4[:, anchors:], anchor_v], dim=2).reshape(chunk_count * targets, -1, channels)
        target_q = q4[:, anchors:].reshape(chunk_count * targets, tokens, channels)
        out[:, anchors:] = attend(target_q, ext_k, ext_v).reshape(chunk_count, targets, tokens, channels)
    return out.reshape(total, tokens, channels)


def _anchor_contribution(anchor_x: Tensor, matrix_filter: MatrixFilter | None) -> Tensor:
    """The anchors' matrices as other images see them: [chunks, A, N, C], filtered once per anchor."""
    if matrix_filter is None:
        return anchor_x
    chunks, anchors, tokens, channels = anchor_x.shape
    filtered = matrix_filter(anchor_x.reshape(chunks * anchors, tokens, channels))
    return filtered.reshape(chunks, anchors, tokens, channels)


def _pair_contribution(anchor_k: Tensor, anchor_v: Tensor, pair_filter: PairFilter) -> tuple[Tensor, Tensor]:
    """Both anchors' matrices as other images see them, filtered in one call: [chunks, A, N, C] each."""
    chunks, anchors, tokens, channels = anchor_k.shape
    keys, values = pair_filter(anchor_k.reshape(chunks * anchors, tokens, channels),
                               anchor_v.reshape(chunks * anchors, tokens, anchor_v.shape[-1]))
    return (keys.reshape(chunks, anchors, tokens, channels),
            values.reshape(chunks, anchors, tokens, anchor_v.shape[-1]))
