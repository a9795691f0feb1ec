"""attention/spectrum.py against the definitions of docs/method.md section 3.

The oracle below restates each definition in plain Python (lists, math.fsum), independent of
the implementation's tensor code. Matrix tests build X = U diag(s) V^T from a chosen spectrum,
take the float64 SVD of the actual (rounded) input as ground truth, apply the oracle to its
singular values and compare with the singular values of the filtered matrix.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spectral_anchors.attention.spectrum import (
    ENERGY_TOL,
    EXP_ALPHA_MAX,
    EXP_ALPHA_MIN,
    Reweight,
    Spectrum,
    Truncate,
    apply_chain_values,
    quantile_keep_count,
    reweight_values,
    truncate_values,
    validate_reweight,
    validate_truncate,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Oracle: the definitions, literally
# ---------------------------------------------------------------------------------------------


def oracle_truncate(values: list[float], mode: str, value: float) -> list[float]:
    r = len(values)
    # Ties: the lower index wins (stable descending order).
    order = sorted(range(r), key=lambda i: (-values[i], i))
    if mode == "fixed":
        keep = min(int(value), r)
    elif mode == "quantile":
        keep = min(r, max(1, math.ceil(value * r - 1e-9)))
    else:
        total = math.fsum(v * v for v in values)
        keep = r
        if total > 0 and value < 1:
            running = []
            for rank, index in enumerate(order):
                running.append(values[index] ** 2)
                if math.fsum(running) / total >= value - ENERGY_TOL:
                    keep = rank + 1
                    break
    kept = set(order[:keep])
    return [v if i in kept else 0.0 for i, v in enumerate(values)]


def oracle_reweight(values: list[float], mode: str, alpha: float) -> list[float]:
    if mode == "exp":
        s_max = max(values, default=0.0)
        shaped = [v * math.exp(alpha * v / s_max) if v > 0 else 0.0 for v in values]
    else:
        logs = [max(math.log(v), 0.0) if v > 0 else 0.0 for v in values]
        shaped = logs if mode == "log" else [x * x for x in logs]
    norm_shaped = math.sqrt(math.fsum(x * x for x in shaped))
    if norm_shaped == 0:
        return list(values)
    norm = math.sqrt(math.fsum(v * v for v in values))
    return [x * norm / norm_shaped for x in shaped]


def oracle_chain(values: list[float], steps) -> list[float]:
    for step in steps:
        if isinstance(step, Truncate):
            values = oracle_truncate(values, step.mode, step.value)
        else:
            values = oracle_reweight(values, step.mode, step.alpha)
    return values


def well_conditioned(values: list[float], steps) -> bool:
    """False when the definition is (nearly) discontinuous at this spectrum: an energy threshold
    met within rounding, or a log reweighting whose reshaped norm is nearly zero. There, any
    finite-precision computation may legitimately land on either side; the vector tests pin the
    exact boundary behaviour instead."""
    expected = sorted(oracle_chain(values, steps), reverse=True)
    scale = max(math.sqrt(math.fsum(v * v for v in values)), 1e-300)
    # Alternating wiggles move neighbours apart; uniform ones move every value across 1 together (log of a
    # spectrum whose values all sit at 1 is all zero one way and not the other).
    for sign in (1.0, -1.0):
        for pattern in (0, 1, None):
            wiggled = [v * (1 + sign * 1e-6 * (1 if pattern is None else (i + pattern) % 2 * 2 - 1))
                       for i, v in enumerate(values)]
            other = sorted(oracle_chain(wiggled, steps), reverse=True)
            if max((abs(a - b) for a, b in zip(expected, other, strict=True)), default=0.0) > 1e-4 * scale:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Strategies and matrix helpers
# ---------------------------------------------------------------------------------------------

# Values that make the interesting cases likely: exact zeros, ties, values around 1 (where the
# log reweightings switch on), and a range of magnitudes.
singular_value = st.one_of(
    st.just(0.0),
    st.sampled_from([0.5, 1.0, 2.0, 3.0, 100.0]),
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
)
truncate_step = st.one_of(
    st.builds(Truncate, st.just("fixed"), st.integers(1, 12).map(float)),
    st.builds(Truncate, st.just("quantile"), st.floats(0.01, 1.0)),
    st.builds(Truncate, st.just("energy"), st.one_of(st.just(1.0), st.floats(0.05, 1.0))),
)
reweight_step = st.one_of(
    st.builds(Reweight, st.sampled_from(["log", "log_squared"])),
    st.builds(Reweight, st.just("exp"), st.floats(EXP_ALPHA_MIN, EXP_ALPHA_MAX)),
)
any_step = st.one_of(truncate_step, reweight_step)


def matrix_with_spectrum(values: list[float], tokens: int, channels: int, seed: int, dtype) -> torch.Tensor:
    """[1, tokens, channels] with singular values `values` (len = min(tokens, channels))."""
    generator = torch.Generator().manual_seed(seed)
    r = len(values)
    left = torch.linalg.qr(torch.randn(tokens, r, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(channels, r, generator=generator, dtype=torch.float64)).Q
    s = torch.tensor(values, dtype=torch.float64)
    return ((left * s) @ right.T).to(dtype).unsqueeze(0)


def true_singular_values(x: torch.Tensor) -> list[float]:
    return torch.linalg.svdvals(x[0].double()).tolist()


def tolerance(before: list[float], after: list[float], dtype, tokens: int, channels: int) -> float:
    """Absolute tolerance on output singular values, from the error model of the method
    (before/after: true input values and the definition's output, in the same order):
    - the float64 Gram eigenproblem gets each singular value s_i to ~ m eps64 s_max^2 / s_i
      (m = max(T, C); eigenvalue error ~ m eps64 lambda_max, halved by the square root; 4x
      margin), and the chain scales that error by its factor f_i / s_i;
    - values up to the rounding floor sqrt(m eps64) s_max count as zero, so such a value may
      come out anywhere between 0 and its own size or its defined output;
    - the rebuild X V diag(f/s) V^T rounds at eps of the working dtype (float32, or float64
      for float64 input) relative to ||X|| max(f/s); 64 eps covers accumulation over <= 9 terms.
    """
    eps64 = torch.finfo(torch.float64).eps
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    m = max(tokens, channels)
    s_max = max(before, default=0.0)
    floor = math.sqrt(m * eps64) * s_max
    factors = [(b, a / b) for a, b in zip(after, before, strict=True) if b > 0]
    resolution = max([f * 4 * m * eps64 * s_max**2 / b for b, f in factors if b > floor] + [0.0])
    unresolved = max([max(a, b) for a, b in zip(after, before, strict=True) if b <= floor] + [0.0])
    rebuild = 64 * eps * s_max * max([f for _, f in factors] + [1.0])
    return resolution + unresolved + floor + rebuild + 1e-300


def assert_spectrum(actual: list[float], expected: list[float], atol: float) -> None:
    actual = sorted(actual, reverse=True)
    expected = sorted(expected, reverse=True)
    worst = max((abs(a - b) for a, b in zip(actual, expected, strict=True)), default=0.0)
    assert worst <= atol, f"singular values off by {worst:.3g} > {atol:.3g}\n{actual}\n{expected}"


# ---------------------------------------------------------------------------------------------
# The definitions on value vectors
# ---------------------------------------------------------------------------------------------


@FAST
@given(st.lists(singular_value, min_size=1, max_size=16), truncate_step)
def test_truncate_values_matches_definition(values, step):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    if step.mode == "energy":
        # torch's cumsum and math.fsum round differently; a cumulative fraction within 1e-12 of
        # the threshold may fall either way (the exact-boundary cases have their own tests).
        total = math.fsum(v * v for v in values)
        fractions = [math.fsum(v * v for v in s.tolist()[: k + 1]) / total for k in range(len(values))] if total else []
        assume(all(abs(f - (step.value - ENERGY_TOL)) > 1e-12 for f in fractions))
    assert truncate_values(s, step.mode, step.value).tolist() == oracle_truncate(s.tolist(), step.mode, step.value)


@FAST
@given(st.lists(singular_value, min_size=1, max_size=16), reweight_step)
def test_reweight_values_matches_definition(values, step):
    s = torch.tensor(values, dtype=torch.float64)
    result = reweight_values(s, step.mode, step.alpha)
    expected = oracle_reweight(values, step.mode, step.alpha)
    # float64 end to end: 1e-12 relative is ~1e4 ulps, room for the different summation orders.
    scale = max(math.sqrt(math.fsum(v * v for v in values)), 1e-300)
    assert torch.allclose(result, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12 * scale)


@FAST
@given(st.lists(singular_value, min_size=1, max_size=16), reweight_step)
def test_reweight_preserves_norm_keeps_zeros_and_stays_finite(values, step):
    s = torch.tensor(values, dtype=torch.float64)
    result = reweight_values(s, step.mode, step.alpha)
    assert torch.isfinite(result).all()
    assert (result >= 0).all()
    assert torch.allclose(torch.linalg.vector_norm(result), torch.linalg.vector_norm(s), rtol=1e-12, atol=0)
    assert (result[s == 0] == 0).all()


@FAST
@given(st.lists(singular_value, min_size=1, max_size=16), st.lists(any_step, min_size=1, max_size=4))
def test_truncated_values_never_come_back(values, steps):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    zeroed = s == 0
    for step in steps:
        s = apply_chain_values(s, (step,))
        assert torch.isfinite(s).all()
        # Once zero, always zero: no step revives a dropped component.
        assert (s[zeroed] == 0).all()
        zeroed |= s == 0


@pytest.mark.parametrize(
    "q, r, kept",
    [(0.05, 100, 5), (0.07, 100, 7), (0.1, 30, 3), (0.29, 100, 29), (0.05, 640, 32), (0.01, 10, 1),
     (1e-9, 1280, 1), (1.0, 640, 640), (0.999, 1000, 999), (0.5, 1, 1),
     # fractional q r: the ceiling, never the floor or the rounding
     (0.25, 10, 3), (0.05, 50, 3), (0.3, 7, 3), (0.15, 10, 2), (0.05, 1280, 64), (0.05, 1000, 50)],
)
def test_quantile_keep_count_is_the_exact_ceiling(q, r, kept):
    assert quantile_keep_count(q, r) == kept
    s = torch.linspace(10, 1, r, dtype=torch.float64)
    assert int((truncate_values(s, "quantile", q) > 0).sum()) == kept


def test_fixed_keeps_n_largest_and_everything_when_n_exceeds_rank():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert truncate_values(s, "fixed", 2).tolist() == [5.0, 4.0, 0.0, 0.0, 0.0]
    assert truncate_values(s, "fixed", 50).tolist() == s.tolist()


@FAST
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=16), st.floats(0.01, 1.0))
def test_energy_keeps_the_smallest_sufficient_prefix(values, q):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    kept = int((truncate_values(s, "energy", q) > 0).sum())
    fraction = (s.square().cumsum(0) / s.square().sum()).tolist()
    assert fraction[kept - 1] >= q - ENERGY_TOL
    if q < 1:
        assert kept == 1 or fraction[kept - 2] < q - ENERGY_TOL
    else:
        assert kept == len(values)


def test_energy_one_keeps_even_a_negligible_last_component():
    s = torch.tensor([1e4, 1.0, 1e-5], dtype=torch.float64)
    assert truncate_values(s, "energy", 1.0).tolist() == s.tolist()
    # The float32 cumulative sum rounds to exactly 1 before the last value; still kept.
    assert truncate_values(s.float(), "energy", 1.0).tolist() == s.float().tolist()


def test_energy_threshold_met_exactly_is_met():
    s = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert truncate_values(s, "energy", 0.5).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_ties_keep_the_lower_index():
    s = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    assert truncate_values(s, "fixed", 2).tolist() == [3.0, 2.0, 0.0, 0.0, 0.0]
    unsorted = torch.tensor([1.0, 2.0, 3.0, 2.0])
    assert truncate_values(unsorted, "fixed", 2).tolist() == [0.0, 2.0, 3.0, 0.0]


def test_all_zero_spectrum_stays_zero_everywhere():
    zero = torch.zeros(2, 6, dtype=torch.float64)
    for step in (Truncate("energy", 0.9), Truncate("quantile", 0.5), Reweight("log"), Reweight("exp", -3)):
        assert apply_chain_values(zero, (step,)).tolist() == zero.tolist()


def test_log_of_values_at_most_one_keeps_the_original_spectrum():
    s = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert reweight_values(s, "log", 1.0).tolist() == s.tolist()
    assert reweight_values(s, "log_squared", 1.0).tolist() == s.tolist()


def test_exp_is_scale_free():
    s = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    for alpha in (EXP_ALPHA_MIN, -1.0, 2.0, EXP_ALPHA_MAX):
        small = reweight_values(s, "exp", alpha)
        huge = reweight_values(s * 1e4, "exp", alpha)
        assert torch.allclose(huge, small * 1e4, rtol=1e-12)
        assert torch.isfinite(huge).all()


def test_chain_order_matters_and_each_step_sees_the_previous_output():
    s = torch.tensor([400.0, 20.0, 3.0, 1.5, 0.5], dtype=torch.float64)
    flatten_then_cut = (Reweight("log_squared"), Truncate("energy", 0.95))
    cut_then_flatten = (Truncate("energy", 0.95), Reweight("log_squared"))
    a = apply_chain_values(s, flatten_then_cut).tolist()
    b = apply_chain_values(s, cut_then_flatten).tolist()
    assert a == pytest.approx(oracle_chain(s.tolist(), flatten_then_cut), rel=1e-12)
    assert b == pytest.approx(oracle_chain(s.tolist(), cut_then_flatten), rel=1e-12)
    # Energy 0.95 of the raw spectrum is the top value alone; after flattening it is not.
    assert sum(v > 0 for v in b) == 1 and sum(v > 0 for v in a) > 1


# ---------------------------------------------------------------------------------------------
# Filtering matrices
# ---------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.data(),
    st.lists(any_step, min_size=1, max_size=3),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**16),
)
def test_filtered_singular_values_follow_the_definition(tokens, channels, data, steps, dtype, seed):
    r = min(tokens, channels)
    values = data.draw(st.lists(singular_value, min_size=r, max_size=r))
    x = matrix_with_spectrum(values, tokens, channels, seed, dtype)
    before = true_singular_values(x)
    assume(well_conditioned(before, steps))
    expected = oracle_chain(before, steps)
    spectrum = Spectrum(tuple(steps))
    filtered, s_before, s_after = spectrum.filter_with_values(x)
    assert filtered.shape == x.shape and filtered.dtype == dtype
    atol = tolerance(before, expected, dtype, tokens, channels)
    assert_spectrum(true_singular_values(filtered), expected, atol)
    # The reported values are the definition's too (float32 output adds eps32 relative).
    atol_reported = atol + 4 * torch.finfo(torch.float32).eps * max(max(expected), max(before))
    assert_spectrum(s_before[0].tolist(), before, atol_reported)
    assert_spectrum(s_after[0].tolist(), expected, atol_reported)


def reference_filter(x: torch.Tensor, steps) -> torch.Tensor:
    """The method by its definition: float64 thin SVD, the oracle's chain on its values (plain Python, independent
    of the implementation's chain code), rebuild."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    values = torch.tensor([oracle_chain(row, tuple(steps)) for row in s.tolist()], dtype=torch.float64)
    return (u * values.reshape(s.shape).unsqueeze(-2)) @ vh


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual.double() - reference) / torch.linalg.norm(reference).clamp_min(1e-300))


@FAST
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.lists(any_step, min_size=1, max_size=3),
    st.integers(0, 2**16),
)
def test_singular_vectors_are_kept(tokens, channels, steps, seed):
    # Distinct, well-separated values: the reference's singular vectors are then unique, so the
    # whole rebuilt matrix (not just its spectrum) must match the SVD-based definition.
    r = min(tokens, channels)
    values = [10.0 ** (3 - 2 * i / max(r - 1, 1)) for i in range(r)]
    x = matrix_with_spectrum(values, tokens, channels, seed, torch.float64)
    assume(well_conditioned(true_singular_values(x), steps))
    # Through the Gram matrix the smallest value is accurate to ~ m eps64 (s_max / s_min)^2
    # = 9 * 2.2e-16 * 1e4 = 2e-11 relative, and a reweighting may make it dominate the output
    # (exp(-10) lifts it e^10 over s_max): 1e-9 leaves a 50x margin.
    assert relative_error(Spectrum(tuple(steps))(x), reference_filter(x, steps)) < 1e-9


@pytest.mark.parametrize("tokens, channels", [(48, 12), (12, 48), (1, 7), (7, 1), (1, 1), (16, 16)])
def test_tall_wide_and_degenerate_shapes(tokens, channels):
    generator = torch.Generator().manual_seed(tokens * 100 + channels)
    x = torch.randn(3, tokens, channels, generator=generator) * 5
    for steps in ([Truncate("quantile", 0.3)], [Reweight("log_squared"), Truncate("energy", 0.9)],
                  [Reweight("exp", 2.0)], [Truncate("fixed", 1), Reweight("log")]):
        out = Spectrum(tuple(steps))(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert relative_error(out, reference_filter(x, steps)) < 1e-5


def test_rank_deficient_and_zero_matrices():
    # float64, so that the zero singular values are zero to 1e-16: exp(-10) rescales the small
    # end of a spectrum by up to e^10, which would lift a float32 input's rounding noise (~1e-7
    # s_max) to a 1e-3 effect in the reference itself.
    generator = torch.Generator().manual_seed(1)
    shape = {"generator": generator, "dtype": torch.float64}
    rank_two = (torch.randn(1, 20, 2, **shape) @ torch.randn(1, 2, 8, **shape)) * 3
    zero = torch.zeros(1, 20, 8, dtype=torch.float64)
    x = torch.cat([rank_two, zero])
    for steps in ([Truncate("energy", 1.0)], [Truncate("quantile", 0.5)], [Reweight("log")],
                  [Reweight("exp", -10.0)], [Reweight("log_squared"), Truncate("fixed", 1)]):
        out, before, after = Spectrum(tuple(steps)).filter_with_values(x)
        assert torch.isfinite(out).all() and torch.isfinite(before).all() and torch.isfinite(after).all()
        assert (out[1] == 0).all() and (after[1] == 0).all()
        # The six zero directions stay zero (the floor): nothing but the rank-two part remains.
        assert int((after[0] > 0).sum()) <= 2
        assert relative_error(out[:1], reference_filter(x[:1], steps)) < 1e-9


def test_log_of_a_matrix_with_all_values_below_one_returns_it_unchanged():
    x = matrix_with_spectrum([0.9, 0.5, 0.1], 10, 3, seed=3, dtype=torch.float32)
    for mode in ("log", "log_squared"):
        out = Spectrum((Reweight(mode),))(x)
        assert torch.equal(out, x)


def test_batch_items_are_filtered_independently():
    # The rebuild shares one width across the batch; that must not leak between matrices.
    x = torch.cat([
        matrix_with_spectrum([100.0, 50.0, 1.0, 0.5, 0.1, 0.0], 30, 6, seed=5, dtype=torch.float32),
        matrix_with_spectrum([3.0] * 6, 30, 6, seed=6, dtype=torch.float32),
        torch.zeros(1, 30, 6),
    ])
    for steps in ([Truncate("energy", 0.9)], [Reweight("log"), Truncate("quantile", 0.5)]):
        spectrum = Spectrum(tuple(steps))
        together = spectrum(x)
        alone = torch.cat([spectrum(x[i : i + 1]) for i in range(3)])
        assert torch.allclose(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_round_trip(dtype):
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 64, 16, generator=generator) * 4).to(dtype)
    spectrum = Spectrum((Reweight("log_squared"), Truncate("energy", 0.95)))
    out, before, after = spectrum.filter_with_values(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert before.dtype == after.dtype == torch.float32 and before.shape == (2, 16)
    # The work is done in float32 (float64 for float64), so what is lost is the final rounding
    # to dtype (eps/2 per entry) plus the computation's own error (~1e-6 in float32, far below
    # half-precision eps; ~1e-15 in float64, hence the 1e-13 term).
    reference = reference_filter(x.double(), spectrum.steps)
    assert relative_error(out, reference) < 4 * torch.finfo(dtype).eps + 1e-13


def test_identity_chain_returns_its_input_at_no_cost():
    x = torch.randn(2, 8, 4)
    identity = Spectrum()
    assert identity.is_identity and repr(identity) == "identity"
    assert identity(x) is x
    out, before, after = identity.filter_with_values(x)
    assert torch.equal(out, x) and torch.equal(before, after)


@pytest.mark.parametrize("step", [Truncate("fixed", 10_000), Truncate("energy", 1.0), Truncate("quantile", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_identity_equivalent_chains_reproduce_the_input(step, dtype):
    x = (torch.randn(2, 40, 12) * 7).to(dtype)
    out = Spectrum((step,))(x)
    assert out.dtype == dtype
    # Nothing changed in the spectrum, so the input comes back as it was (the contract only asks
    # for 1e-5 relative; the implementation skips the rebuild).
    assert relative_error(out, x.double()) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["exact", "lowrank"])
def test_non_finite_matrices_pass_through_without_poisoning_the_batch(bad, method):
    x = torch.randn(2, 10, 4)
    x[1, 3, 2] = bad
    spectrum = Spectrum((Truncate("fixed", 2),), method=method)
    out, before, after = spectrum.filter_with_values(x)
    assert torch.equal(out[1].nan_to_num(), x[1].nan_to_num()) and torch.equal(out[1].isnan(), x[1].isnan())
    # lowrank keeps 2 + oversampling >= r = 4 columns here, so it is exact too.
    assert relative_error(out[:1], reference_filter(x[:1], spectrum.steps)) < 1e-5
    assert torch.isfinite(before[0]).all() and before[1].isnan().all() and after[1].isnan().all()


def test_bad_input_is_refused():
    spectrum = Spectrum((Truncate("fixed", 1),))
    with pytest.raises(ValueError, match=r"\[n, T, C\]"):
        spectrum(torch.randn(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        spectrum(torch.ones(1, 4, 4, dtype=torch.int64))
    empty = torch.zeros(0, 4, 3)
    assert spectrum(empty).shape == empty.shape


# ---------------------------------------------------------------------------------------------
# Realistic sizes: exactness against a float64 SVD
# ---------------------------------------------------------------------------------------------


def realistic_matrix(tokens: int, channels: int, seed: int) -> torch.Tensor:
    """Low-rank structure plus noise, singular values spanning 1e-2 .. 1e3 (float32)."""
    generator = torch.Generator().manual_seed(seed)
    r = min(tokens, channels)
    values = torch.logspace(3, -2, r, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(tokens, r, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(channels, r, generator=generator, dtype=torch.float64)).Q
    structured = (left * values) @ right.T
    noise = torch.randn(tokens, channels, generator=generator, dtype=torch.float64) * 1e-3
    return (structured + noise).float().unsqueeze(0)


@pytest.mark.parametrize("tokens, channels", [(4096, 640), (1024, 1280)])
def test_exact_at_sdxl_sizes(tokens, channels):
    x = realistic_matrix(tokens, channels, seed=tokens)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    for steps in ([Truncate("quantile", 0.05)], [Reweight("log_squared"), Truncate("energy", 0.95)],
                  [Reweight("log")], [Reweight("exp", 3.0)], [Truncate("fixed", 64), Reweight("log_squared")]):
        values = torch.tensor([oracle_chain(row, tuple(steps)) for row in s.tolist()], dtype=torch.float64)
        reference = (u * values.unsqueeze(-2)) @ vh
        # The product target: 1e-4 relative (Frobenius). Measured: <= ~1e-5.
        assert relative_error(Spectrum(tuple(steps))(x), reference) < 1e-4, steps


def test_lowrank_is_an_explicit_approximation():
    x = realistic_matrix(512, 96, seed=7)
    exact = Spectrum((Truncate("quantile", 0.1),))
    approximate = Spectrum((Truncate("quantile", 0.1),), method="lowrank")
    assert repr(approximate) == "quantile(0.1) [lowrank]"
    assert approximate.then(Reweight("log")).method == "lowrank"
    state = torch.random.get_rng_state()
    first = approximate(x)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert torch.equal(first, approximate(x))  # and the result is reproducible
    # The spectrum decays by 10x every ~54 values; 10 oversampled columns and 2 power iterations
    # capture the top 10 to well within 1e-3.
    assert relative_error(first, exact(x).double()) < 1e-3
    with pytest.raises(ValueError, match="method"):
        Spectrum(method="fast")


# ---------------------------------------------------------------------------------------------
# The value object
# ---------------------------------------------------------------------------------------------


def test_repr_names_the_chain():
    chain = Spectrum().then(Reweight("log_squared")).then(Truncate("energy", 0.95))
    assert repr(chain) == "log_squared -> energy(0.95)"
    assert repr(Spectrum((Truncate("fixed", 32.0),))) == "fixed(32)"
    assert repr(Spectrum((Truncate("quantile", 0.05), Reweight("exp", -2.5), Reweight("log")))) == (
        "quantile(0.05) -> exp(-2.5) -> log"
    )


def test_spectrum_is_immutable_and_hashable():
    base = Spectrum((Truncate("quantile", 0.05),))
    longer = base.then(Reweight("log"))
    assert base.steps == (Truncate("quantile", 0.05),) and len(longer.steps) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.steps = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.steps[0].value = 0.5
    twin = Spectrum([Truncate("quantile", 0.05)])
    assert base == twin and hash(base) == hash(twin)
    assert len({base, longer, Spectrum((Truncate("quantile", 0.05),))}) == 2
    with pytest.raises(TypeError):
        Spectrum(("log",))


@pytest.mark.parametrize(
    "mode, value, message",
    [("fixed", 0, "whole number"), ("fixed", 2.5, "whole number"), ("fixed", float("inf"), "whole number"),
     ("quantile", 0.0, "0 < q <= 1"), ("quantile", 1.5, "0 < q <= 1"), ("energy", -0.1, "0 < q <= 1"),
     ("energy", float("nan"), "0 < q <= 1"), ("top", 1.0, "Unknown truncation mode"),
     ("quantile", "0.5", "must be a number")],
)
def test_truncate_validation(mode, value, message):
    with pytest.raises(ValueError, match=message):
        validate_truncate(mode, value)
    with pytest.raises(ValueError, match=message):
        Truncate(mode, value)


@pytest.mark.parametrize(
    "mode, alpha, message",
    [("exp", EXP_ALPHA_MAX + 0.5, "between"), ("exp", EXP_ALPHA_MIN - 1, "between"),
     ("exp", float("nan"), "finite"), ("sqrt", 1.0, "Unknown reweighting mode")],
)
def test_reweight_validation(mode, alpha, message):
    with pytest.raises(ValueError, match=message):
        validate_reweight(mode, alpha)
    with pytest.raises(ValueError, match=message):
        Reweight(mode, alpha)


def test_valid_settings_pass_validation():
    validate_truncate("fixed", 1)
    validate_truncate("fixed", 640.0)
    validate_truncate("quantile", 1.0)
    validate_truncate("energy", 1e-6)
    validate_reweight("exp", EXP_ALPHA_MIN)
    validate_reweight("exp", EXP_ALPHA_MAX)
    validate_reweight("log", 100.0)  # alpha is unused by the log modes
