"""attention/masks.py against docs/method.md section 2 (subject masks, Otsu, mask dropout) on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_anchors.attention.masks import (
    HISTORY_STEPS,
    SubjectMaskHistory,
    anchor_subject_tokens,
    otsu_foreground,
    otsu_threshold,
    pad_token_positions,
    subject_masks,
    subject_token_probabilities,
    upsample_maps,
)


def naive_otsu_threshold(values: list[float]) -> float:
    """Otsu by definition: try every threshold t between distinct values, class 0 = values <= t."""
    best, best_t = -1.0, math.inf
    count = len(values)
    for t in sorted(set(values))[:-1]:
        lower = [v for v in values if v <= t]
        upper = [v for v in values if v > t]
        w0, w1 = len(lower) / count, len(upper) / count
        between = w0 * w1 * (sum(lower) / len(lower) - sum(upper) / len(upper)) ** 2
        if between > best + 1e-15:
            best, best_t = between, t
    return best_t


def test_otsu_splits_a_two_mode_set_at_the_gap():
    generator = torch.Generator().manual_seed(0)
    low = 0.1 + 0.1 * torch.rand(70, generator=generator)
    high = 0.7 + 0.2 * torch.rand(30, generator=generator)
    values = torch.cat([low, high])[torch.randperm(100, generator=generator)]
    assert otsu_threshold(values).item() == low.max().item()
    assert torch.equal(otsu_foreground(values), values > 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_the_definition_on_random_rows(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(3, 40, generator=generator) ** 3
    rows[1, :20] = rows[1, 20:]  # repeated values: splits inside a run of equal values are not thresholds
    for row, threshold in zip(rows, otsu_threshold(rows), strict=True):
        assert threshold.item() == pytest.approx(naive_otsu_threshold(row.tolist()), abs=0)


def test_otsu_of_a_constant_row_is_empty_and_rows_are_independent():
    rows = torch.stack([torch.full((10,), 0.3), torch.tensor([0.0] * 7 + [1.0] * 3)])
    foreground = otsu_foreground(rows)
    assert not foreground[0].any()
    assert foreground[1].tolist() == [False] * 7 + [True] * 3


def block_map(grid, rows, cols):
    image = torch.zeros(grid)
    image[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return image.flatten()


def test_upsampling_a_non_square_grid_keeps_orientation_and_finds_the_block():
    source = (4, 6)
    maps = block_map(source, (1, 3), (3, 5))[None, None]  # [B=1, S=1, 24]
    resized = upsample_maps(maps, source, (8, 12))
    assert resized.shape == (1, 1, 96)
    # The block covers rows 1-2, columns 3-4 of the 4x6 grid: rows 2-5, columns 6-9 of the 8x12 grid.
    masks = subject_masks(maps, torch.ones(1, 1, dtype=torch.bool), source, (8, 12))
    assert torch.equal(masks[0], block_map((8, 12), (2, 6), (6, 10)).bool())
    # The same map read as a transposed 6x4 grid would put the block elsewhere.
    assert not torch.equal(masks[0], subject_masks(maps, torch.ones(1, 1, dtype=torch.bool), (6, 4), (12, 8))[0])


def test_upsampling_to_an_odd_grid():
    # A 7x11 latent halves to a 4x6 grid (odd sizes round up): the map must stretch, not be cropped.
    source, target = (4, 6), (7, 11)
    maps = block_map(source, (0, 2), (0, 3))[None, None]
    mask = subject_masks(maps, torch.ones(1, 1, dtype=torch.bool), source, target)[0].reshape(target)
    rows, cols = mask.nonzero().unbind(1)
    assert mask.shape == target
    assert rows.min() == 0 and cols.min() == 0
    # Half the height and half the width of the source, within one target cell of rounding.
    assert abs(rows.max().item() + 1 - 3.5) <= 1 and abs(cols.max().item() + 1 - 5.5) <= 1


def test_masks_unite_the_subject_tokens_and_ignore_padding():
    grid = (4, 6)
    first = block_map(grid, (0, 2), (0, 2))
    second = block_map(grid, (2, 4), (4, 6))
    maps = torch.stack([torch.stack([first, second]), torch.stack([first, second])])  # [2, 2, 24]
    index, valid = pad_token_positions([(3, 4), (5,)])
    assert valid.tolist() == [[True, True], [True, False]]
    masks = subject_masks(maps, valid, grid, grid)
    assert torch.equal(masks[0], (first + second).bool())
    assert torch.equal(masks[1], first.bool())


def test_subject_token_probabilities_match_a_per_head_softmax():
    generator = torch.Generator().manual_seed(1)
    heads, head_dim = 2, 4
    q = torch.randn(2, 6, heads * head_dim, generator=generator)
    k = torch.randn(2, 5, heads * head_dim, generator=generator)
    index = torch.tensor([[1, 3], [4, 0]])
    ours = subject_token_probabilities(q, k, heads, index)
    assert ours.shape == (2, 2, 6)
    for b in range(2):
        per_head = []
        for h in range(heads):
            qh = q[b, :, h * head_dim:(h + 1) * head_dim]
            kh = k[b, :, h * head_dim:(h + 1) * head_dim]
            per_head.append(torch.softmax(qh @ kh.T / math.sqrt(head_dim), dim=-1))
        average = torch.stack(per_head).mean(0)  # [N, T]
        assert torch.allclose(ours[b], average[:, index[b]].T, atol=1e-6)


def test_history_averages_the_last_twenty_steps_before_the_current_one():
    history = SubjectMaskHistory([(1,)], dropout=0.0, seed=0)
    grid = (2, 3)
    assert history.averaged_maps(0) is None
    for step in range(25):
        # Two layers per step: their mean is the step's value.
        history.record(step, torch.full((1, 1, 6), float(step) - 0.5), grid)
        history.record(step, torch.full((1, 1, 6), float(step) + 0.5), grid)
        if step == 0:
            assert history.averaged_maps(0) is None  # a step never uses its own, unfinished maps
    averaged = history.averaged_maps(25)
    expected = sum(range(25 - HISTORY_STEPS, 25)) / HISTORY_STEPS
    assert torch.allclose(averaged, torch.full((1, 1, 6), expected))
    # Before step 24 is finished, step 24 sees the 20 steps 4..23.
    assert history.averaged_maps(24) is not None


def test_no_mask_before_one_step_is_read_then_anchor_tokens_come_from_the_mask():
    grid = (4, 6)
    history = SubjectMaskHistory([(1,), (1,), (1,)], dropout=0.0, seed=0)
    maps = torch.stack([block_map(grid, (0, 2), (0, 3)), block_map(grid, (2, 4), (3, 6)),
                        block_map(grid, (1, 3), (1, 4))])[:, None]
    assert history.anchor_keep(0, grid, 2) is None
    history.record(0, maps, grid)
    assert history.anchor_keep(0, grid, 2) is None
    keep = history.anchor_keep(1, grid, 2)
    assert [k.tolist() for k in keep] == [maps[a, 0].nonzero().flatten().tolist() for a in range(2)]


def dropout_history(seed=7, dropout=0.5):
    grid = (8, 12)
    history = SubjectMaskHistory([(2,), (2,)], dropout=dropout, seed=seed)
    maps = torch.stack([block_map(grid, (0, 8), (0, 6)), block_map(grid, (0, 8), (6, 12))])[:, None]
    history.record(0, maps, grid)
    return history, maps


def test_dropout_drops_the_given_fraction_of_each_anchors_subject_tokens():
    history, maps = dropout_history()
    for step in (1, 2):
        keep = history.anchor_keep(step, (8, 12), 2)
        for anchor in range(2):
            subject = set(maps[anchor, 0].nonzero().flatten().tolist())
            assert len(keep[anchor]) == 24 and set(keep[anchor].tolist()) <= subject
    assert [len(k) for k in dropout_history(dropout=0.0)[0].anchor_keep(1, (8, 12), 2)] == [48, 48]
    assert [len(k) for k in dropout_history(dropout=1.0)[0].anchor_keep(1, (8, 12), 2)] == [0, 0]


def test_dropout_is_reproducible_redrawn_per_step_and_shared_by_the_layers_of_a_grid():
    first, _ = dropout_history(seed=7)
    second, _ = dropout_history(seed=7)
    grid = (8, 12)
    step_one = [k.tolist() for k in first.anchor_keep(1, grid, 2)]
    # Another layer of the same grid in the same step gets the same tokens, and so does a fresh run.
    assert [k.tolist() for k in first.anchor_keep(1, grid, 2)] == step_one
    assert [k.tolist() for k in second.anchor_keep(1, grid, 2)] == step_one
    # Redrawn every step; a different seed draws differently; the two anchors draw differently.
    assert [k.tolist() for k in first.anchor_keep(2, grid, 2)] != step_one
    assert [k.tolist() for k in dropout_history(seed=8)[0].anchor_keep(1, grid, 2)] != step_one
    assert step_one[0] != [t - 6 for t in step_one[1]]  # anchor 1's block is anchor 0's, 6 columns right
    # An anchor's tokens do not depend on how many anchors are asked for.
    assert second.anchor_keep(1, grid, 1)[0].tolist() == step_one[0]


def test_dropout_differs_between_grid_sizes():
    masks = torch.ones(2, 96, dtype=torch.bool)
    one = anchor_subject_tokens(masks, 2, 0.5, seed=0, step=3, grid=(8, 12))
    other = anchor_subject_tokens(masks, 2, 0.5, seed=0, step=3, grid=(12, 8))
    assert [k.tolist() for k in one] != [k.tolist() for k in other]


def test_a_new_coarsest_grid_restarts_the_history_and_bad_dropout_is_refused():
    # Deep Shrink: the coarsest grid is 1x2 inside its window and 2x3 after it.
    generator = torch.Generator().manual_seed(0)
    history = SubjectMaskHistory([(1,), (2,)], dropout=0.0, seed=0)
    for step in range(3):
        history.record(step, torch.rand(2, 1, 2, generator=generator), (1, 2))
    after = torch.rand(2, 1, 6, generator=generator)
    after[:, :, :2] += 1.0
    history.record(3, after, (2, 3))
    assert history.source_grid == (2, 3)
    assert history.masks(3, (4, 6)) is None  # nothing of the new grid has closed yet: anchors share all tokens
    fresh = SubjectMaskHistory([(1,), (2,)], dropout=0.0, seed=0)
    fresh.record(3, after, (2, 3))
    assert torch.equal(history.averaged_maps(4), after)
    assert torch.equal(history.masks(4, (4, 6)), fresh.masks(4, (4, 6)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        SubjectMaskHistory([(1,)], dropout=1.5, seed=0)
