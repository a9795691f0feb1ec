"""attention/correspondence.py and attention/injection.py against docs/method.md section 2 (feature injection)."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_anchors.attention.correspondence import (
    FLAT_SPREAD,
    correspondence_sources,
    dense_correspondence,
    distance_threshold,
    gaussian_kernel,
    nearest_neighbours,
    smooth_features,
)
from spectral_anchors.attention.injection import (
    InjectionIndex,
    inject_matched_outputs,
    injection_index,
    nearest_step,
)
from spectral_anchors.attention.schedule import SigmaWindow, steps_in_window

GRID = (6, 10)  # non-square on purpose
TOKENS = GRID[0] * GRID[1]


def random_map(channels=16, seed=0, grid=GRID):
    return torch.randn(channels, *grid, generator=torch.Generator().manual_seed(seed))


def token_of(row, col, grid=GRID):
    return row * grid[1] + col


# --- smoothing -----------------------------------------------------------------------------------------------------

def test_gaussian_kernel_is_the_normalised_sigma_one_kernel():
    kernel = gaussian_kernel()
    side = [math.exp(-0.5), 1.0, math.exp(-0.5)]
    expected = torch.tensor([[a * b for b in side] for a in side])
    assert torch.allclose(kernel, (expected / expected.sum()).float(), atol=1e-7)


def test_smoothing_an_impulse_gives_the_kernel_and_keeps_constants():
    impulse = torch.zeros(1, 2, *GRID)
    impulse[0, 1, 3, 4] = 1.0
    smoothed = smooth_features(impulse)
    assert torch.allclose(smoothed[0, 1, 2:5, 3:6], gaussian_kernel(), atol=1e-7)
    assert smoothed[0, 1].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(smoothed[0, 0], torch.zeros(GRID))
    constant = torch.full((2, 3, *GRID), 2.5)
    assert torch.allclose(smooth_features(constant), constant, atol=1e-6)  # replicated borders: no dark edges


# --- sources and nearest neighbours -------------------------------------------------------------------------------

def test_targets_take_from_anchors_and_anchors_from_other_anchors():
    assert correspondence_sources(0, 2) == [1]
    assert correspondence_sources(1, 2) == [0]
    assert correspondence_sources(3, 2) == [0, 1]
    assert correspondence_sources(0, 1) == []


def test_nearest_neighbour_is_by_cosine_not_by_length():
    keys = torch.tensor([[1.0, 0.0], [10.0, 10.0], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 1.2], [5.0, 0.1], [0.0, 0.0]])
    distance, index = nearest_neighbours(queries, keys)
    assert index.tolist()[:2] == [1, 0]
    assert distance[0].item() == pytest.approx(1 - (1.0 + 1.2) / (math.sqrt(2) * math.hypot(1.0, 1.2)), abs=1e-6)
    assert distance[2].item() == pytest.approx(1.0)  # a zero vector is equally far from everything, not NaN


@pytest.mark.parametrize("transform", ["shift", "flip"])
def test_a_shifted_or_flipped_copy_maps_back_exactly(transform):
    anchor = random_map(seed=1)
    if transform == "shift":
        copy = torch.roll(anchor, shifts=(2, 3), dims=(1, 2))  # copy[r, c] = anchor[r - 2, c - 3]

        def origin(r, c):
            return (r - 2) % GRID[0], (c - 3) % GRID[1]
    else:
        copy = torch.flip(anchor, dims=(2,))  # copy[r, c] = anchor[r, W - 1 - c]

        def origin(r, c):
            return r, GRID[1] - 1 - c
    features = torch.stack([anchor, random_map(seed=2), copy])
    result = dense_correspondence(features, anchor_count=2)
    expected = torch.tensor([token_of(*origin(r, c)) for r in range(GRID[0]) for c in range(GRID[1])])
    assert torch.equal(result.source_image[2], torch.zeros(TOKENS, dtype=torch.long))
    assert torch.equal(result.source_token[2], expected)
    assert result.distance[2].abs().max().item() < 1e-5
    assert bool(result.injected[2].all())  # every distance ~0: one class, all under the threshold


def test_best_source_per_token_and_the_anchors_among_themselves():
    first, second = random_map(seed=3), random_map(seed=4)
    target = first.clone()
    target[:, :, 5:] = second[:, :, 5:]  # left half from anchor 0, right half from anchor 1
    result = dense_correspondence(torch.stack([first, second, target]), anchor_count=2)
    columns = torch.arange(TOKENS) % GRID[1]
    assert torch.equal(result.source_image[2], (columns >= 5).long())
    assert torch.equal(result.source_token[2], torch.arange(TOKENS))
    # Anchor 0 takes from anchor 1 only, anchor 1 from anchor 0 only; never from the target.
    assert bool((result.source_image[0] == 1).all()) and bool((result.source_image[1] == 0).all())


def test_a_single_anchor_has_no_source_and_is_never_injected():
    features = torch.stack([random_map(seed=5), random_map(seed=6), random_map(seed=7)])
    result = dense_correspondence(features, anchor_count=1)
    assert bool((result.source_image[0] == -1).all()) and not bool(result.injected[0].any())
    assert math.isinf(result.distance[0, 0].item())
    assert bool((result.source_image[1:] == 0).all())


def test_sources_offer_only_their_subject_tokens_and_receivers_need_their_own_mask():
    anchor = random_map(seed=8)
    target = anchor.clone()
    masks = torch.zeros(2, TOKENS, dtype=torch.bool)
    masks[0, : TOKENS // 2] = True  # anchor's subject: the top half
    masks[1, TOKENS // 4:] = True
    result = dense_correspondence(torch.stack([anchor, target]), anchor_count=1, subject_masks=masks)
    offered = masks[0].nonzero().flatten()
    assert bool(torch.isin(result.source_token[1], offered).all())
    # Tokens whose exact twin is offered map to it; the others must settle for a worse match.
    assert torch.equal(result.source_token[1, : TOKENS // 2], torch.arange(TOKENS // 2))
    assert result.distance[1, TOKENS // 2:].min().item() > 0.05
    assert not bool((result.injected[1] & ~masks[1]).any())
    # The exact twins (distance 0) form the lower Otsu class; inside the receiver's own mask they are injected.
    assert torch.equal(result.injected[1], masks[1] & (torch.arange(TOKENS) < TOKENS // 2))


def test_an_empty_source_mask_offers_nothing():
    features = torch.stack([random_map(seed=9), random_map(seed=10)])
    masks = torch.zeros(2, TOKENS, dtype=torch.bool)
    masks[1] = True
    result = dense_correspondence(features, anchor_count=1, subject_masks=masks)
    assert not bool(result.injected.any())


def test_mask_shape_must_match_the_grid():
    with pytest.raises(ValueError, match="subject masks"):
        dense_correspondence(torch.randn(2, 4, *GRID), 1, torch.ones(2, TOKENS + 1, dtype=torch.bool))


# --- Otsu on the best distances -----------------------------------------------------------------------------------

def test_otsu_splits_a_two_mode_distance_set_at_the_gap():
    generator = torch.Generator().manual_seed(11)
    near = 0.10 + 0.02 * torch.rand(30, generator=generator)
    far = 0.70 + 0.05 * torch.rand(50, generator=generator)
    distances = torch.cat([near, far])[torch.randperm(80, generator=generator)]
    threshold = distance_threshold(distances[None])[0].item()
    assert near.max().item() <= threshold < far.min().item()
    assert threshold == pytest.approx(near.max().item())


def test_injected_tokens_are_the_lower_class_without_masks():
    anchor = random_map(seed=12)
    target = random_map(seed=13)
    twins = torch.zeros(TOKENS, dtype=torch.bool)
    twins[::3] = True
    flat_target = target.flatten(1)
    flat_target[:, twins] = anchor.flatten(1)[:, twins]  # a third of the target are exact copies of the anchor
    result = dense_correspondence(torch.stack([anchor, flat_target.reshape(target.shape)]), anchor_count=1)
    assert torch.equal(result.injected[1], twins)
    assert torch.equal(result.source_token[1, twins], twins.nonzero().flatten())


def test_a_flat_distance_row_is_one_class():
    row = torch.full((1, 20), 0.3)
    row[0, 5] += FLAT_SPREAD / 2
    assert math.isinf(distance_threshold(row)[0].item())
    assert math.isinf(distance_threshold(torch.full((1, 4), math.inf))[0].item())  # no source: nothing qualifies


# --- the injection itself -------------------------------------------------------------------------------------

def test_injection_blends_from_a_copy_and_touches_nothing_else():
    chunks, images, channels = 2, 3, 5
    outputs = torch.randn(chunks * images, TOKENS, channels, generator=torch.Generator().manual_seed(14))
    injected = torch.zeros(images, TOKENS, dtype=torch.bool)
    source_image = torch.full((images, TOKENS), -1, dtype=torch.long)
    source_token = torch.zeros(images, TOKENS, dtype=torch.long)
    # Anchors 0 and 1 swap token 7 (each is the other's source: blending must read the originals), the target 2
    # takes token 3 from anchor 1's token 9.
    for image, token, src_image, src_token in ((0, 7, 1, 7), (1, 7, 0, 7), (2, 3, 1, 9)):
        injected[image, token] = True
        source_image[image, token] = src_image
        source_token[image, token] = src_token

    class Fake:  # the fields injection_index reads
        pass

    correspondence = Fake()
    correspondence.injected, correspondence.source_image, correspondence.source_token = (
        injected, source_image, source_token)
    correspondence.token_count, correspondence.image_count = TOKENS, images
    index = injection_index(correspondence)
    strength = 0.8
    cond_first_row = images  # the cond chunk is the second chunk here
    result = inject_matched_outputs(outputs, cond_first_row, index, strength)

    expected = outputs.clone()
    base = cond_first_row
    for image, token, src_image, src_token in ((0, 7, 1, 7), (1, 7, 0, 7), (2, 3, 1, 9)):
        expected[base + image, token] = (strength * outputs[base + src_image, src_token]
                                         + (1 - strength) * outputs[base + image, token])
    assert torch.equal(result, expected)
    changed = (result != outputs).any(-1)
    assert changed.sum().item() == 3 and not bool(changed[:images].any())
    assert torch.equal(inject_matched_outputs(outputs, base, index, 1.0)[base + 2, 3], outputs[base + 1, 9])


def test_an_empty_index_is_the_identity():
    outputs = torch.randn(2, TOKENS, 4)
    empty = InjectionIndex(2, TOKENS, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert torch.equal(inject_matched_outputs(outputs, 0, empty, 0.8), outputs)
    with pytest.raises(ValueError):
        inject_matched_outputs(outputs[:, :-1], 0, empty, 0.8)


# --- when ---------------------------------------------------------------------------------------------------------

def test_window_steps_are_the_steps_whose_sigma_lies_in_it():
    schedule = [14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0]
    assert list(steps_in_window(schedule, SigmaWindow(8.0, 1.0))) == [1, 2, 3, 4]
    assert list(steps_in_window(schedule, SigmaWindow(1e9, 0.0))) == list(range(6))
    assert list(steps_in_window(schedule, SigmaWindow(3.0, 2.5))) == []
    # A KSamplerAdvanced split hands each part the tail of the same schedule: the window stays on the same sigmas.
    assert list(steps_in_window(schedule[3:], SigmaWindow(8.0, 1.0))) == [0, 1]


def test_nearest_step_prefers_the_earlier_step_on_ties():
    assert nearest_step([999, 700, 400, 261.4, 100], 261) == 3
    assert nearest_step([300, 222], 261) == 0
    with pytest.raises(ValueError):
        nearest_step([], 261)
