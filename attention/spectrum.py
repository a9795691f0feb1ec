"""Spectral filtering of the anchors' keys and values (docs/method.md section 3).

A SPECTRUM is an immutable chain of steps, each acting on the singular values of a matrix
X [T, C]: truncation zeroes the tail, reweighting reshapes the spectrum and rescales it to
keep ||s||_2. The singular vectors never change, so the whole chain runs on the value vector
and the matrix is rebuilt once: X' = sum_i f(s_i) u_i v_i^T.

The decomposition goes through the eigenproblem of the smaller Gram matrix (C x C or T x T),
which is far cheaper than a thin SVD of a tall matrix and gives the same values and vectors.
Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

TruncateMode = Literal["fixed", "quantile", "energy"]
ReweightMode = Literal["log", "log_squared", "exp"]
Method = Literal["exact", "lowrank"]

TRUNCATE_MODES: tuple[str, ...] = ("fixed", "quantile", "energy")
REWEIGHT_MODES: tuple[str, ...] = ("log", "log_squared", "exp")
METHODS: tuple[str, ...] = ("exact", "lowrank")

# Range of the exp reweighting's alpha (the node widget's range). Because alpha multiplies
# s / s_max <= 1, exp(|alpha|) <= e^10 ~ 2.2e4 keeps everything finite in float32 and float64.
EXP_ALPHA_MIN = -10.0
EXP_ALPHA_MAX = 10.0

# quantile: ceil(q * r) in floating point can land one above the intended integer
# (0.07 * 100 = 7.000000000000001); the epsilon absorbs that without moving real fractions.
QUANTILE_EPS = 1e-9
# energy: E(k) is compared with q - ENERGY_TOL so that a threshold met exactly is met despite
# rounding in the cumulative sum; q = 1 is special-cased to keep everything.
ENERGY_TOL = 1e-6
# Extra columns for the opt-in randomized SVD, and its power iterations (Halko et al. 2011:
# oversampling 5-10 and 1-2 power iterations make the captured subspace close to optimal).
LOWRANK_OVERSAMPLING = 10
LOWRANK_NITER = 2


def _is_whole(value: float) -> bool:
    return math.isfinite(value) and float(value).is_integer()


def validate_truncate(mode: str, value: float) -> None:
    """Raise ValueError with a user-facing message if (mode, value) is not a valid truncation."""
    if mode not in TRUNCATE_MODES:
        raise ValueError(
            f"Unknown truncation mode {mode!r}; expected one of {', '.join(TRUNCATE_MODES)}."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Truncation value must be a number, got {value!r}.")
    if mode == "fixed":
        if not _is_whole(value) or value < 1:
            raise ValueError(
                f"fixed truncation keeps a whole number of singular values (1 or more); got {value!r}."
            )
    elif not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"{mode} truncation needs a fraction q with 0 < q <= 1 (e.g. 0.05 keeps 5%); got {value!r}."
        )


def validate_reweight(mode: str, alpha: float) -> None:
    """Raise ValueError with a user-facing message if (mode, alpha) is not a valid reweighting."""
    if mode not in REWEIGHT_MODES:
        raise ValueError(
            f"Unknown reweighting mode {mode!r}; expected one of {', '.join(REWEIGHT_MODES)}."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"Reweighting alpha must be a finite number, got {alpha!r}.")
    if mode == "exp" and not (EXP_ALPHA_MIN <= alpha <= EXP_ALPHA_MAX):
        raise ValueError(
            f"exp reweighting needs alpha between {EXP_ALPHA_MIN:g} and {EXP_ALPHA_MAX:g}; got {alpha!r}."
        )


def _number(value: float) -> str:
    return format(value, "g")


@dataclass(frozen=True)
class Truncate:
    """Zero the small singular values.

    fixed N keeps the N largest; quantile q keeps ceil(q r) (at least 1); energy q keeps the
    smallest k whose cumulative energy sum_{j<=k} s_j^2 / sum s^2 reaches q - 1e-6 (q = 1 keeps
    all).
    """

    mode: TruncateMode
    value: float

    def __post_init__(self) -> None:
        validate_truncate(self.mode, self.value)

    @property
    def label(self) -> str:
        if self.mode == "fixed":
            return f"fixed({int(self.value)})"
        return f"{self.mode}({_number(self.value)})"


@dataclass(frozen=True)
class Reweight:
    """Reshape the spectrum, then rescale it so that ||s'||_2 == ||s||_2.

    log: max(ln s, 0); log_squared: max(ln s, 0)^2; exp: s * exp(alpha * s / s_max).
    alpha is used by exp only.
    """

    mode: ReweightMode
    alpha: float = 1.0

    def __post_init__(self) -> None:
        validate_reweight(self.mode, self.alpha)

    @property
    def label(self) -> str:
        if self.mode == "exp":
            return f"exp({_number(self.alpha)})"
        return self.mode


Step = Truncate | Reweight


# ---------------------------------------------------------------------------------------------
# The definitions, on singular-value vectors
# ---------------------------------------------------------------------------------------------


def quantile_keep_count(q: float, r: int) -> int:
    """Number of values a quantile-q truncation keeps out of r: ceil(q r), at least 1."""
    if r <= 0:
        return 0
    return min(r, max(1, math.ceil(q * r - QUANTILE_EPS)))


def truncation_keep_mask(s: Tensor, mode: str, value: float) -> Tensor:
    """Which of the singular values s [..., r] a truncation keeps (bool, same shape).

    Values are ranked with a stable descending sort, so among equal values the one with the
    lower index is kept. Usually s is sorted descending already; after a non-monotone
    reweighting (exp with alpha < -1) it may not be, and "the N largest" still means by value.
    """
    validate_truncate(mode, value)
    r = s.shape[-1]
    if r == 0:
        return torch.ones_like(s, dtype=torch.bool)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(s, -1, order)
    position = torch.arange(r, device=s.device)
    if mode == "fixed":
        keep_ranked = (position < min(int(value), r)).expand(ranked.shape)
    elif mode == "quantile":
        keep_ranked = (position < quantile_keep_count(value, r)).expand(ranked.shape)
    else:
        # float64 so the cumulative energy is accurate far below ENERGY_TOL.
        energy = ranked.double().square()
        total = energy.sum(-1, keepdim=True)
        fraction = energy.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
        reached = fraction >= value - ENERGY_TOL
        if value >= 1.0:
            # q = 1 keeps every component, even one whose energy is below the rounding of the
            # total (1e4 and 1e-5 together: 1e8 + 1e-10 == 1e8 in float64).
            reached = torch.zeros_like(reached)
        # Keep every rank up to the first that reaches q. An all-zero spectrum never reaches
        # it and keeps everything, i.e. stays zero.
        first = torch.where(
            reached.any(-1, keepdim=True), reached.int().argmax(-1, keepdim=True), r - 1
        )
        keep_ranked = position <= first
    return torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)


def truncate_values(s: Tensor, mode: str, value: float) -> Tensor:
    """Apply a truncation to singular values s [..., r] (non-negative): the dropped values
    become 0. Ties are broken by index (see truncation_keep_mask)."""
    return torch.where(truncation_keep_mask(s, mode, value), s, torch.zeros_like(s))


def reweight_values(s: Tensor, mode: str, alpha: float = 1.0) -> Tensor:
    """Apply a reweighting to singular values s [..., r] (non-negative); returns a new tensor.

    The reshaped values are rescaled to the input's L2 norm per vector. Zeros stay zero in every
    mode (ln 0 counts as no contribution), so values zeroed by an earlier truncation never return.
    If the reshaped vector is all zero (log modes with every s <= 1) the input is returned
    unchanged, and an all-zero input stays zero: never NaN or inf.

    exp uses s * exp(alpha * s / s_max): the study's s * exp(alpha * s) overflows for the
    singular values of real keys and values (tens to thousands); dividing by s_max makes alpha
    scale-free.
    """
    validate_reweight(mode, alpha)
    if s.shape[-1] == 0:
        return s.clone()
    work = s.double()
    positive = work > 0
    if mode == "exp":
        s_max = work.amax(-1, keepdim=True)
        ratio = work / s_max.clamp_min(torch.finfo(torch.float64).tiny)
        shaped = work * torch.exp(alpha * ratio)
    else:
        # log of a placeholder 1 where s == 0, so no -inf is ever formed.
        log = torch.log(torch.where(positive, work, torch.ones_like(work))).clamp_min(0.0)
        shaped = log if mode == "log" else log.square()
    shaped = torch.where(positive, shaped, torch.zeros_like(shaped))
    norm_in = torch.linalg.vector_norm(work, dim=-1, keepdim=True)
    norm_shaped = torch.linalg.vector_norm(shaped, dim=-1, keepdim=True)
    degenerate = norm_shaped == 0
    scale = norm_in / torch.where(degenerate, torch.ones_like(norm_shaped), norm_shaped)
    out = torch.where(degenerate, work, shaped * scale)
    return out.to(s.dtype)


def apply_step_values(s: Tensor, step: Step) -> Tensor:
    """One chain step on singular values."""
    if isinstance(step, Truncate):
        return truncate_values(s, step.mode, step.value)
    if isinstance(step, Reweight):
        return reweight_values(s, step.mode, step.alpha)
    raise TypeError(f"Not a spectrum step: {step!r}")


def apply_chain_values(s: Tensor, steps: tuple[Step, ...]) -> Tensor:
    """The whole chain on singular values, in order; each step sees the previous output."""
    for step in steps:
        s = apply_step_values(s, step)
    return s


def chain_factors(s: Tensor, steps: tuple[Step, ...]) -> tuple[Tensor, Tensor]:
    """(values after the chain, per-direction factor) for singular values s [..., r].

    The factor scales each singular direction (after = factor * s where s > 0). It is tracked
    step by step rather than taken as after / s because after / s says nothing about a
    direction whose value is zero (exactly, or at the solver's rounding floor): such a direction
    keeps factor 1 unless a truncation drops it. Its value stays zero whatever the chain does,
    and whatever tiny content the matrix has along it is left as it was -- neither removed by
    a reweighting nor lifted by its rescale.
    """
    values = s
    factor = torch.ones_like(s)
    for step in steps:
        if isinstance(step, Truncate):
            keep = truncation_keep_mask(values, step.mode, step.value)
            values = torch.where(keep, values, torch.zeros_like(values))
            factor = torch.where(keep, factor, torch.zeros_like(factor))
        elif isinstance(step, Reweight):
            shaped = reweight_values(values, step.mode, step.alpha)
            positive = values > 0
            ratio = shaped / torch.where(positive, values, torch.ones_like(values))
            factor = torch.where(positive, factor * ratio, factor)
            values = shaped
        else:
            raise TypeError(f"Not a spectrum step: {step!r}")
    return values, factor


# ---------------------------------------------------------------------------------------------
# Decomposition and rebuild
# ---------------------------------------------------------------------------------------------


def _solver_device(device: torch.device) -> torch.device:
    # MPS has no float64; the Gram matrix is small, so its eigenproblem moves to the CPU.
    return torch.device("cpu") if device.type == "mps" else device


# Row chunk and column blocks of the float64 Gram: chunks keep the float64 copy small (a whole
# 4096 x 640 copy is a fresh 20 MB allocation whose page faults cost as much as the product), and
# only the blocks on and above the diagonal are multiplied (G is symmetric): 10 of 16 products.
GRAM_ROW_CHUNK = 512
GRAM_COLUMN_BLOCKS = 4


def _gram_float64(rows: Tensor) -> Tensor:
    """rows^T rows in float64 for rows [n, N, m]; every product of float32 entries is exact there."""
    n, count, size = rows.shape
    gram = torch.zeros(n, size, size, dtype=torch.float64, device=rows.device)
    edges = [size * block // GRAM_COLUMN_BLOCKS for block in range(GRAM_COLUMN_BLOCKS + 1)]
    for start in range(0, count, GRAM_ROW_CHUNK):
        chunk = rows[:, start:start + GRAM_ROW_CHUNK].to(torch.float64)
        for low, high in zip(edges, edges[1:], strict=False):
            if high > low:
                gram[:, low:high, low:].baddbmm_(chunk[:, :, low:high].mT, chunk[:, :, low:])
    upper = torch.triu(gram)
    return upper + torch.triu(gram, 1).mT


def _gram_eigen(x: Tensor) -> tuple[Tensor, Tensor, bool, Tensor]:
    """Singular values and one side's singular vectors of x [n, T, C] (float32 or float64).

    Returns (s [n, r] float64 descending, basis [n, m, r] float64, tall, finite [n] bool): for
    tall (T >= C) the basis is V (right vectors, m = C), otherwise U (left vectors, m = T).
    A matrix with a NaN or inf entry has a non-finite Gram diagonal; it is marked not finite
    and decomposed as zero (checking the small Gram costs less than scanning x).

    Gram and eigenproblem are both float64. Products of float32 numbers are exact in float64,
    so the only error left is the solver's ~1e-16 ||G||: singular values are resolved down to
    ~1e-8 s_max. A float32 Gram carries ~1e-7 ||G||, which corrupts every singular value below
    ~3e-4 s_max and the directions of close neighbours -- the small values the log
    reweightings lift, and the noise bulk a truncation often cuts into. Measured at 4096 x 640
    against a float64 SVD: a float32 eigenproblem errs by up to 1e-2 (log reweighting) and
    2e-3..5e-3 (quantile 0.05 cutting into the bulk of a few-spikes-plus-noise matrix), so even
    pure truncation stays in float64; float64 errs by <= 3e-5 and ~3e-7 respectively. The
    float64 Gram and eigenproblem cost ~1.4x their float32 versions.
    """
    tall = x.shape[-2] >= x.shape[-1]
    solver = _solver_device(x.device)
    gram_eps = torch.finfo(torch.float64).eps
    if solver != x.device:
        # MPS has no float64: Gram in float32 on the device, eigenproblem on the CPU.
        gram = (x.mT @ x if tall else x @ x.mT).to(solver, torch.float64)
        gram_eps = torch.finfo(torch.float32).eps
    else:
        gram = _gram_float64(x if tall else x.mT)
    finite = torch.isfinite(gram).flatten(1).all(1)
    # Unconditional (no host sync): the Gram is small, and the caller checks `finite` once.
    gram = torch.where(finite[:, None, None], gram, torch.zeros_like(gram))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(-1)  # eigh sorts ascending
    # A zero direction comes out as rounding noise of either sign, up to ~0.15 max(T, C) eps
    # lambda_max (measured). Call everything up to max(T, C) eps lambda_max an exact zero: else
    # a reweighting's rescale (up to e^10 for exp) would lift the noise of a rank-deficient
    # matrix into visible directions. In singular values the floor is ~1e-6 s_max at SDXL
    # sizes, below the resolution of a float32 input anyway.
    floor = max(x.shape[-2], x.shape[-1]) * gram_eps * eigenvalues[..., :1]
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))
    s = eigenvalues.sqrt()
    basis = eigenvectors.flip(-1)
    return s, basis, tall, finite


def _rebuild_from_basis(x: Tensor, basis: Tensor, factor: Tensor, tall: bool) -> Tensor:
    """x V diag(factor) V^T (tall) or U diag(factor) U^T x (wide), in x's dtype.

    Only the leading columns up to the last non-zero factor take part, so a truncation to k
    values costs two thin [T, C] x [C, k] products instead of a full [T, C] x [C, C] one.
    """
    nonzero = (factor != 0).any(0)
    if not bool(nonzero.any()):
        return torch.zeros_like(x)
    width = int(nonzero.nonzero().max()) + 1
    basis = basis[..., :width].to(x.device, x.dtype)
    factor = factor[..., :width].to(x.device, x.dtype)
    size = basis.shape[-2]
    if 2 * width < size:
        if tall:
            return ((x @ basis) * factor.unsqueeze(-2)) @ basis.mT
        return basis @ ((basis.mT @ x) * factor.unsqueeze(-1))
    operator = (basis * factor.unsqueeze(-2)) @ basis.mT
    return x @ operator if tall else operator @ x


def _lowrank_columns(steps: tuple[Step, ...], r: int) -> int:
    """Columns for the randomized SVD: what the chain's fixed/quantile steps can keep, plus
    oversampling. A chain without such a step (energy, reweighting only) needs every value, so
    it gets all r columns -- no saving, but no hidden approximation either."""
    bound = r
    for step in steps:
        if isinstance(step, Truncate) and step.mode == "fixed":
            bound = min(bound, int(step.value))
        elif isinstance(step, Truncate) and step.mode == "quantile":
            bound = min(bound, quantile_keep_count(step.value, r))
    return min(r, bound + LOWRANK_OVERSAMPLING)


@dataclass(frozen=True)
class Spectrum:
    """An immutable chain of spectral filter steps (the SPECTRUM value of the nodes).

    Calling it on float matrices x [n, T, C] filters each x[i] independently and returns the
    same shape and dtype. The empty chain is the identity and returns x itself at no cost.

    method "exact" (default) decomposes through the Gram matrix's eigenproblem in float64 and
    rebuilds in float32 (float64 for float64 input): <= ~3e-5 relative error against a float64
    SVD on realistic spectra (the rebuild's float32 rounding, amplified by how much the chain
    lifts small values relative to s_max, dominates).
    method "lowrank" is an explicit approximation: torch.svd_lowrank with q = (what the chain's
    fixed/quantile steps keep) + LOWRANK_OVERSAMPLING columns and LOWRANK_NITER power
    iterations; the chain then runs on those q values, as if the matrix were its rank-q
    approximation (energy fractions and reweighting norms are relative to that).
    """

    steps: tuple[Step, ...] = ()
    method: Method = "exact"

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        for step in steps:
            if not isinstance(step, (Truncate, Reweight)):
                raise TypeError(f"Spectrum steps must be Truncate or Reweight, got {step!r}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown spectrum method {self.method!r}; expected one of {', '.join(METHODS)}.")
        object.__setattr__(self, "steps", steps)

    def then(self, step: Step) -> Spectrum:
        """A new chain with step appended (applied after the existing steps)."""
        return replace(self, steps=self.steps + (step,))

    @property
    def is_identity(self) -> bool:
        return not self.steps

    def __repr__(self) -> str:
        text = " -> ".join(step.label for step in self.steps) if self.steps else "identity"
        return text if self.method == "exact" else f"{text} [{self.method}]"

    def __call__(self, x: Tensor) -> Tensor:
        if self.is_identity:
            return x
        return self._filter(x)[0]

    def filter_with_values(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(filtered x, singular values before [n, r], after [n, r]); values in float32,
        descending by the 'before' values, for plotting what the chain did."""
        return self._filter(x)

    def _filter(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.ndim != 3:
            raise ValueError(f"Spectrum expects matrices shaped [n, T, C], got shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"Spectrum expects a floating-point tensor, got {x.dtype}.")
        n, tokens, channels = x.shape
        r = min(tokens, channels)
        if x.numel() == 0:
            empty = torch.zeros(n, r, dtype=torch.float32, device=x.device)
            return x.clone(), empty, empty.clone()
        # Half-precision input is worked on in float32 (docs/method.md section 3: K and V in float32); float64
        # input keeps its precision.
        work = x if x.dtype == torch.float64 else x.float()
        # A non-finite matrix has no spectrum: it passes through untouched (values reported as
        # NaN) instead of poisoning the solver and, with it, the rest of the batch.
        if self.method == "lowrank":
            finite = torch.isfinite(work).flatten(1).all(1)
            clean = torch.where(finite[:, None, None], work, torch.zeros_like(work))
            filtered, before, after = self._filter_lowrank(clean, r)
        else:
            before, basis, tall, finite = _gram_eigen(work)
            after, factor = chain_factors(before, self.steps)
            unchanged = (factor == 1).all(-1)
            if bool(unchanged.all()):
                # Nothing to do (identity chain, fixed N >= r, energy 1.0): return the input
                # as it was rather than a rounding-perturbed rebuild.
                filtered = work
            else:
                filtered = _rebuild_from_basis(work, basis, factor, tall)
                if bool(unchanged.any()):
                    filtered = torch.where(unchanged.to(x.device)[:, None, None], work, filtered)

        if not bool(finite.all()):
            keep = ~finite.to(x.device)
            filtered = torch.where(keep[:, None, None], x.to(filtered.dtype), filtered)
            nan = torch.full_like(before, float("nan"))
            before = torch.where(keep[:, None].to(before.device), nan, before)
            after = torch.where(keep[:, None].to(after.device), nan, after)
        return (
            filtered.to(x.dtype),
            before.to(x.device, torch.float32),
            after.to(x.device, torch.float32),
        )

    def _filter_lowrank(self, work: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        columns = _lowrank_columns(self.steps, r)
        # A fixed seed in a forked RNG: the randomized range finder must neither make sampling
        # irreproducible nor consume the caller's random stream.
        devices = [work.device] if work.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=work.device.type):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(work, q=columns, niter=LOWRANK_NITER)
        s = s.double()
        padded = torch.zeros(work.shape[0], r, dtype=torch.float64, device=work.device)
        padded[:, :columns] = s
        after = apply_chain_values(padded, self.steps)
        rebuilt = (u * after[:, :columns].to(u.dtype).unsqueeze(-2)) @ v.mT
        return rebuilt, padded, after
