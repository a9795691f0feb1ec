"""attention/query_blend.py against docs/method.md section 2 (query blending schedule and mix)."""

from __future__ import annotations

import pytest
import torch

from spectral_anchors.attention.query_blend import blend_queries, blend_step_count, query_blend_weight


def test_weights_fall_linearly_from_0_9_to_0_82_over_the_first_tenth_of_the_steps():
    assert blend_step_count(50) == 5
    weights = [query_blend_weight(step, 50) for step in range(50)]
    assert weights[:5] == pytest.approx([0.9, 0.88, 0.86, 0.84, 0.82])
    assert all(weight is None for weight in weights[5:])


@pytest.mark.parametrize("step_count,blending", [(9, 0), (10, 1), (19, 1), (20, 2), (30, 3)])
def test_short_schedules_blend_fewer_steps(step_count, blending):
    weights = [query_blend_weight(step, step_count) for step in range(step_count)]
    assert sum(weight is not None for weight in weights) == blending
    if blending:
        assert weights[0] == pytest.approx(0.9)
        assert weights[blending - 1] == pytest.approx(0.82 if blending > 1 else 0.9)


def test_blend_mixes_plain_into_shared_queries_and_zero_weight_is_exact():
    generator = torch.Generator().manual_seed(0)
    plain, shared = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 8, generator=generator)
    assert torch.allclose(blend_queries(plain, shared, 0.9), 0.9 * plain + 0.1 * shared)
    assert torch.equal(blend_queries(plain, shared, 0.0), shared)
    assert torch.equal(blend_queries(plain, shared, 1.0), plain)
