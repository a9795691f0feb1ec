"""Devices without float64 (Apple MPS): the float32 paths compute the same definitions, and use no float64 at all.

The paths are forced on the CPU through the functions' device-capability parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spectral_anchors.attention.correspondence import dense_correspondence, distance_threshold
from spectral_anchors.attention.device import (
    dense_linalg_device,
    exact_dtype,
    has_float64,
    has_svd,
    singular_values,
)
from spectral_anchors.attention.masks import SubjectMaskHistory, otsu_threshold


class Float64Ops(TorchDispatchMode):
    """Every aten op that takes or makes a float64 tensor while the mode is on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in tensors):
            self.seen.append(str(func))
        return result


def test_device_capabilities():
    assert has_float64("cpu") and not has_float64("mps")
    assert has_svd("cpu") and not has_svd(torch.device("mps"))
    assert exact_dtype("cpu") == torch.float64 and exact_dtype("mps") == torch.float32
    assert exact_dtype("cpu", float64=False) == torch.float32
    # The spectrum solvers' small factorisations of MPS tensors run on the CPU; every other device keeps its own.
    assert dense_linalg_device("mps") == torch.device("cpu") and dense_linalg_device("cpu") == torch.device("cpu")
    assert dense_linalg_device("cuda:1") == torch.device("cuda:1")


def between_class_variance(values: torch.Tensor, threshold: float) -> float:
    values = values.double()
    lower, upper = values[values <= threshold], values[values > threshold]
    if not len(lower) or not len(upper):
        return 0.0
    return float(len(lower) * len(upper) * (lower.mean() - upper.mean()) ** 2)


@pytest.mark.parametrize("seed", range(4))
def test_float32_otsu_picks_the_split_float64_picks(seed):
    generator = torch.Generator().manual_seed(seed)
    # Attention-probability-like rows at SDXL's 64x64 grid: small values with a heavy tail, and a two-mode row.
    rows = torch.rand(3, 4096, generator=generator) ** 6 * 1e-3
    rows[2, :1000] += 5e-3
    exact = otsu_threshold(rows, float64=True)
    single = otsu_threshold(rows, float64=False)
    assert single.dtype == rows.dtype
    for row, a, b in zip(rows, exact, single, strict=True):
        best = between_class_variance(row, float(a))
        # The same split, or one whose between-class variance ties the best to float32 rounding.
        assert float(a) == float(b) or between_class_variance(row, float(b)) >= best * (1 - 1e-5)
    assert float(exact[2]) == float(single[2]) == float(rows[2, 1000:].max())


def test_float32_otsu_uses_no_float64():
    rows = torch.rand(2, 500, generator=torch.Generator().manual_seed(1))
    with Float64Ops() as ops:
        otsu_threshold(rows, float64=False)
        distance_threshold(rows, float64=False)
    assert ops.seen == []
    with Float64Ops() as ops:
        otsu_threshold(rows, float64=True)
    assert ops.seen  # the check itself sees float64 when there is some


def test_float32_subject_masks_and_correspondence_match_and_use_no_float64():
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 1, 24, generator=generator)
    maps[:, :, :8] += 1.0  # a clear subject region on the 4x6 grid
    results = {}
    for float64 in (True, False):
        history = SubjectMaskHistory(((1,), (2,), (3,)), dropout=0.0, seed=0, float64=float64)
        features = torch.randn(3, 8, 8, 12, generator=torch.Generator().manual_seed(5))
        with Float64Ops() as ops:
            history.record(0, maps, (4, 6))
            masks = history.masks(1, (8, 12))
            correspondence = dense_correspondence(features, 2, masks, float64=float64)
        results[float64] = (masks, correspondence)
        if not float64:
            assert ops.seen == []
    (masks64, corr64), (masks32, corr32) = results[True], results[False]
    assert torch.equal(masks64, masks32) and masks64.any()
    assert torch.equal(corr64.injected, corr32.injected) and torch.equal(corr64.source_token, corr32.source_token)


def test_singular_values_off_the_device_equal_svdvals_in_float32():
    x = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(3))
    expected = torch.linalg.svdvals(x)
    for on_device in (True, False, None):
        with Float64Ops() as ops:
            values = singular_values(x.half(), on_device=on_device)
        assert ops.seen == [] and values.dtype == torch.float32 and values.device == x.device
        assert torch.allclose(values, torch.linalg.svdvals(x.half().float()), rtol=1e-5, atol=1e-5)
    assert torch.allclose(singular_values(x), expected, rtol=1e-5)
