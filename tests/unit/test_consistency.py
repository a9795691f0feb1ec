"""attention/consistency.py against its definitions, on constructed embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_anchors.attention.consistency import (
    consistency,
    cosine_pairs,
    first_rows,
    mask_images,
    pairwise_mean,
)


def unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float64)
    return vector / vector.norm()


def test_identical_embeddings_score_one_and_a_different_one_lower() -> None:
    same = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    result = consistency(same * torch.tensor([[1.0], [2.0], [0.5], [3.0]]), anchor_count=2)
    assert result.score == pytest.approx(1.0, abs=1e-12)  # lengths do not matter, directions do
    assert result.pairwise == pytest.approx(1.0, abs=1e-12)
    other = same.clone()
    other[3] = torch.randn(16, generator=torch.Generator().manual_seed(1))
    lower = consistency(other, anchor_count=2)
    assert lower.similarity[2] == pytest.approx(1.0, abs=1e-12)
    assert lower.similarity[3] < 0.9
    assert lower.score == pytest.approx((1.0 + lower.similarity[3]) / 2, abs=1e-12)


def test_targets_are_compared_with_the_mean_of_the_normalised_anchors() -> None:
    anchors = torch.stack([unit(1, 0, 0), 5 * unit(0, 1, 0)])  # the second anchor's length must not weigh more
    target = unit(1, 0, 0).unsqueeze(0)
    result = consistency(torch.cat([anchors, target]), anchor_count=2)
    assert result.score == pytest.approx(1 / math.sqrt(2), abs=1e-12)  # cos 45 degrees with (1, 1, 0)
    # Each anchor is compared with the other anchors only, never with itself.
    assert result.similarity[0] == pytest.approx(0.0, abs=1e-12)
    assert result.is_anchor == (True, True, False)


def test_a_single_anchor_has_no_similarity_of_its_own() -> None:
    result = consistency(torch.stack([unit(1, 0), unit(1, 1)]), anchor_count=1)
    assert math.isnan(result.similarity[0])
    assert result.score == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_a_reference_replaces_the_anchors() -> None:
    anchors = torch.stack([unit(1, 0, 0), unit(1, 0, 0)])
    targets = torch.stack([unit(0, 1, 0), unit(0, 1, 1)])
    reference = torch.stack([unit(0, 1, 0), unit(0, 3, 0)])
    with_anchors = consistency(torch.cat([anchors, targets]), anchor_count=2)
    with_reference = consistency(torch.cat([anchors, targets]), anchor_count=2, reference=reference)
    assert with_anchors.score == pytest.approx(0.0, abs=1e-12)
    assert with_reference.compared_with == "reference"
    assert with_reference.score == pytest.approx((1.0 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    assert with_reference.similarity[0] == pytest.approx(0.0, abs=1e-12)  # anchors vs the reference, for the report
    assert with_reference.pairwise == with_anchors.pairwise  # the sheet's own similarity does not change
    # With a reference, zero anchors is allowed: every image is a target.
    assert consistency(targets, anchor_count=0, reference=reference).score == pytest.approx(with_reference.score)


def test_replayed_anchors_are_counted_once() -> None:
    generator = torch.Generator().manual_seed(2)
    scenes = torch.randn(5, 8, generator=generator, dtype=torch.float64)  # scenes 0, 1 anchors; 2, 3, 4 targets
    one_run = consistency(scenes, anchor_count=2)
    # Two runs: [a0, a1, t2, t3] then [a0, a1, t4]; the replayed anchors are identical rows.
    rows = [0, 1, 2, 3, 0, 1, 4]
    split = consistency(scenes[rows], anchor_count=2, scene_of_row=rows)
    assert split.counted == (True, True, True, True, False, False, True)
    assert split.score == pytest.approx(one_run.score, abs=1e-12)
    assert split.pairwise == pytest.approx(one_run.pairwise, abs=1e-12)
    assert [split.similarity[row] for row in (0, 1, 2, 3, 6)] == pytest.approx(list(one_run.similarity), abs=1e-12)
    # Counting every row would weigh the replayed pair (cosine 1 with itself) into the pairwise mean.
    naive = pairwise_mean(scenes[rows])
    assert abs(naive - one_run.pairwise) > 1e-3


def test_first_rows_and_errors() -> None:
    assert first_rows([0, 1, 2, 0, 1, 3]) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="no target"):
        consistency(torch.randn(2, 4), anchor_count=2)
    with pytest.raises(ValueError, match="no anchor and no reference"):
        consistency(torch.randn(3, 4), anchor_count=0)
    with pytest.raises(ValueError, match="scene_of_row"):
        consistency(torch.randn(3, 4), anchor_count=1, scene_of_row=[0, 1])
    with pytest.raises(ValueError, match="anchor_of_row"):
        consistency(torch.randn(3, 4), anchor_count=1, anchor_of_row=[True])


def test_rows_named_by_any_key_with_their_own_anchor_flags() -> None:
    # E.g. reference rows that take the anchor rows of every run, then scenes; the second run replays them.
    rows = torch.stack([unit(1, 0), unit(1, 0.2), unit(1, 0), unit(1, 0.2), unit(0.5, 1)])
    keys = [("reference", 0), 2, ("reference", 0), 3, 4]
    flags = [True, False, True, False, False]
    result = consistency(rows, anchor_count=0, scene_of_row=keys, anchor_of_row=flags)
    assert result.counted == (True, True, False, True, True)
    assert result.is_anchor == (True, False, True, False, False)
    expected = [float(row @ unit(1, 0)) for row in rows[[1, 3, 4]]]
    assert result.score == pytest.approx(sum(expected) / 3, abs=1e-12)


def test_cosine_pairs_match_rows() -> None:
    first = torch.stack([unit(1, 0), unit(0, 1)])
    second = torch.stack([unit(1, 1), unit(0, -1)])
    assert cosine_pairs(first, second).tolist() == pytest.approx([1 / math.sqrt(2), -1.0])


def test_masks_replace_the_background_with_one_colour() -> None:
    generator = torch.Generator().manual_seed(3)
    subject = torch.rand(5, 7, 3, generator=generator)
    images = torch.rand(2, 10, 12, 3, generator=generator)  # different backgrounds
    images[:, 2:7, 3:10] = subject
    masks = torch.zeros(2, 10, 12)
    masks[:, 2:7, 3:10] = 1.0
    fill = (0.25, 0.5, 0.75)
    masked = mask_images(images, masks, fill)
    assert torch.equal(masked[0], masked[1])  # the subjects agree, so the masked images are identical
    assert torch.equal(masked[0, 2:7, 3:10], subject)
    assert masked[0, 0, 0].tolist() == pytest.approx(list(fill))
    # A soft value blends; a mask of another size is resized to the images'.
    half = mask_images(images[:1], torch.full((1, 5, 6), 0.5), fill)
    assert half[0, 0, 0].tolist() == pytest.approx(((images[0, 0, 0] + torch.tensor(fill)) / 2).tolist())
    with pytest.raises(ValueError, match="B = 2"):
        mask_images(images, masks[:1], fill)
