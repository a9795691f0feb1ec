"""Spectral filtering of the anchors' keys and values (docs/method.md section 3).

A SPECTRUM is an immutable chain of steps, each acting on the singular values of a matrix
X [T, C]: truncation zeroes the tail, reweighting reshapes the spectrum and rescales it to
keep ||s||_2. The singular vectors never change, so the whole chain runs on the value vector
and the matrix is rebuilt once: X' = sum_i f(s_i) u_i v_i^T.

Two routes, both held to the precision bound of docs/precision.md against a float64 SVD:
- pure truncation chains that keep few values use a certified iterative top-k solver
  (attention/topk.py), warm-started inside sampling from the previous step's basis;
- everything else decomposes through the eigenproblem of the smaller Gram matrix (C x C or
  T x T), in float64 where the device has it.
Nothing on the filtering path reads a tensor value on the host (no .item(), no branching on
values) except the explicit fallback of a call made outside sampling. Plain PyTorch; never
imports comfy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from . import topk
from .device import dense_linalg_device, has_float64

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


def _accurate(values: Tensor) -> Tensor:
    """Value vectors in float64, except float32 vectors (which come from the float64-less path): their own dtype."""
    return values if values.dtype == torch.float32 else values.double()


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
        # float64 (unless the values come from a device without it) so the cumulative energy is accurate far
        # below ENERGY_TOL.
        energy = _accurate(ranked).square()
        total = energy.sum(-1, keepdim=True)
        fraction = energy.cumsum(-1) / total.clamp_min(torch.finfo(energy.dtype).tiny)
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
    work = _accurate(s)
    positive = work > 0
    if mode == "exp":
        s_max = work.amax(-1, keepdim=True)
        ratio = work / s_max.clamp_min(torch.finfo(work.dtype).tiny)
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
# Which route a chain takes
# ---------------------------------------------------------------------------------------------


def _static_count(step: Truncate, r: int) -> int | None:
    """How many values a fixed or quantile step keeps out of r (known from the shape alone)."""
    if step.mode == "fixed":
        return min(int(step.value), r)
    if step.mode == "quantile":
        return quantile_keep_count(step.value, r)
    return None


def prefix_width(steps: tuple[Step, ...], r: int) -> int:
    """A width w such that every direction beyond the w leading ones ends with factor 0, known from the chain and
    r alone: the fixed/quantile steps that come before any reweighting keep a prefix of the sorted spectrum (a
    reweighting may reorder values, so later steps bound nothing)."""
    width = r
    for step in steps:
        if isinstance(step, Reweight):
            break
        count = _static_count(step, r)
        if count is not None:
            width = min(width, count)
    return width


def keeps_everything(steps: tuple[Step, ...], r: int) -> bool:
    """A pure truncation chain that keeps every value whatever the spectrum (fixed N >= r, quantile 1, energy 1)."""
    for step in steps:
        if not isinstance(step, Truncate):
            return False
        count = _static_count(step, r)
        if count is not None and count < r:
            return False
        if step.mode == "energy" and step.value < 1.0:
            return False
    return True


# A pure energy chain has no bound from the shape: its block is sized for this fraction of the values, and the
# Ritz values then show whether the threshold is met inside the block (else the full decomposition is used).
ENERGY_BLOCK_FRACTION = 0.1


def topk_block(steps: tuple[Step, ...], r: int) -> int | None:
    """Columns of the iterative top-k solver for a pure truncation chain that keeps few values, else None."""
    if not steps or not all(isinstance(step, Truncate) for step in steps):
        return None
    bound = prefix_width(steps, r)
    if bound >= r:
        bound = max(1, math.ceil(ENERGY_BLOCK_FRACTION * r))
    return topk.block_size(bound, r)


# ---------------------------------------------------------------------------------------------
# The full decomposition: the Gram matrix's eigenproblem
# ---------------------------------------------------------------------------------------------


# Row chunk and column blocks of the float64 Gram: chunks keep the float64 copy small (a whole
# 4096 x 640 copy is a fresh 20 MB allocation whose page faults cost as much as the product), and
# only the blocks on and above the diagonal are multiplied (G is symmetric): 10 of 16 products.
GRAM_ROW_CHUNK = 512
GRAM_COLUMN_BLOCKS = 4


def _gram_float64(parts: list[Tensor]) -> Tensor:
    """The upper triangle of rows^T rows in float64 for the stacked parts [n_i, N, m] (zeros below it); every
    product of float32 entries is exact there."""
    size = parts[0].shape[-1]
    gram = torch.zeros(sum(part.shape[0] for part in parts), size, size, dtype=torch.float64,
                       device=parts[0].device)
    edges = [size * block // GRAM_COLUMN_BLOCKS for block in range(GRAM_COLUMN_BLOCKS + 1)]
    offset = 0
    for part in parts:
        own = gram[offset:offset + part.shape[0]]
        offset += part.shape[0]
        for start in range(0, part.shape[1], GRAM_ROW_CHUNK):
            chunk = part[:, start:start + GRAM_ROW_CHUNK].to(torch.float64)
            for low, high in zip(edges, edges[1:], strict=False):
                if high > low:
                    own[:, low:high, low:].baddbmm_(chunk[:, :, low:high].mT, chunk[:, :, low:])
    # Only the upper triangle is filled: the eigensolver reads that one (UPLO="U").
    return gram


def _gram_eigen(parts: list[Tensor], allow_float64: bool = True) -> tuple[Tensor, Tensor, bool, Tensor]:
    """Singular values and one side's singular vectors of the stacked parts [n_i, T, C] (float32 or float64).

    Returns (s [n, r] descending, basis [n, m, r] in ascending order (column r - 1 - i belongs to s_i: the
    leading columns the rebuild takes are flipped there, not the whole basis), tall, finite [n] bool): for tall
    (T >= C) the basis is V (right vectors, m = C), otherwise U (left vectors, m = T). A matrix with a NaN or
    inf entry has a non-finite Gram diagonal; it is marked not finite and decomposed as zero (checking the
    small Gram costs less than scanning x).

    With float64 (allow_float64), Gram and eigenproblem are both float64: products of float32 numbers are exact
    there, so the only error left is the solver's ~1e-16 ||G||, and singular values are resolved down to
    ~1e-8 s_max -- what the reweightings need, since they lift small values. Without float64 (MPS) squaring
    in float32 would lose every value below ~3e-4 s_max, so that path takes a Householder QR of x and the SVD
    of its small triangle instead (_qr_svd): rounding at the level of x, as in a float32 SVD.
    """
    tokens, channels = parts[0].shape[-2:]
    tall = tokens >= channels
    solver = dense_linalg_device(parts[0].device)
    rows = parts if tall else [part.mT for part in parts]
    if not allow_float64 and parts[0].dtype != torch.float64:
        return _qr_svd(rows, solver, tall)
    gram = _gram_float64(rows).to(solver)
    gram_eps = torch.finfo(torch.float64).eps
    # A NaN or inf entry of X reaches its column's diagonal entry of the Gram.
    finite = torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all(-1)
    # Unconditional (no host sync) and in place: the Gram is small.
    gram = _where_into(gram, finite[:, None, None], gram, gram.new_zeros(()))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram, UPLO="U")
    eigenvalues = eigenvalues.flip(-1)  # eigh sorts ascending
    # A zero direction comes out as rounding noise of either sign, up to ~0.15 max(T, C) eps
    # lambda_max (measured). Call everything up to max(T, C) eps lambda_max an exact zero: else
    # a reweighting's rescale (up to e^10 for exp) would lift the noise of a rank-deficient
    # matrix into visible directions. In singular values the floor is ~1e-6 s_max at SDXL
    # sizes in float64, below the resolution of a float32 input anyway.
    floor = max(tokens, channels) * gram_eps * eigenvalues[..., :1]
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))
    s = eigenvalues.sqrt()
    device = parts[0].device
    return s.to(device), eigenvectors.to(device), tall, finite.to(device)


def _qr_svd(rows: list[Tensor], solver: torch.device, tall: bool) -> tuple[Tensor, Tensor, bool, Tensor]:
    """The float32-only full decomposition of the stacked rows [n_i, L, m] (L >= m): R of a QR, then the SVD of
    R [m, m]. Backward stable at the level of x (u ||x||), where a float32 Gram would be at u ||x||^2."""
    device = rows[0].device
    triangles, finites = [], []
    for part in rows:
        finite = torch.isfinite(torch.linalg.vector_norm(part, dim=(-2, -1)))
        clean = torch.where(finite[:, None, None], part, torch.zeros_like(part)).to(solver)
        triangles.append(torch.linalg.qr(clean, mode="r").R)
        finites.append(finite)
    _, s, vh = torch.linalg.svd(torch.cat(triangles))
    # Zero directions come out as rounding noise near sqrt(L) u s_max; L u s_max calls them zero.
    floor = rows[0].shape[-2] * torch.finfo(rows[0].dtype).eps * s[..., :1]
    s = torch.where(s > floor, s, torch.zeros_like(s))
    return s.to(device), vh.mT.flip(-1).to(device), tall, torch.cat(finites)


def _rebuild_from_basis(x: Tensor, basis: Tensor, factor: Tensor, tall: bool, width: int) -> Tensor:
    """x V diag(factor) V^T (tall) or U diag(factor) U^T x (wide), in x's dtype, for a basis in ascending order.

    Only the `width` leading columns take part (the caller knows every later factor is zero), so a truncation
    to k values costs two thin [T, C] x [C, k] products instead of a full [T, C] x [C, C] one.
    """
    basis = basis[..., basis.shape[-1] - width:].flip(-1).to(x.device, x.dtype)
    factor = factor[..., :width].to(x.device, x.dtype)
    size = basis.shape[-2]
    if 2 * width < size:
        if tall:
            return ((x @ basis) * factor.unsqueeze(-2)) @ basis.mT
        return basis @ ((basis.mT @ x) * factor.unsqueeze(-1))
    operator = (basis * factor.unsqueeze(-2)) @ basis.mT
    return x @ operator if tall else operator @ x


def _where_into(target: Tensor, condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """torch.where(condition, x, y), written into `target` (a fresh temporary of that shape) unless autograd
    records the call: on the CPU a new allocation of a layer's K or V costs as much as a product with the block."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return torch.where(condition, x, y)
    return torch.where(condition, x, y, out=target)


def _work_copy(x: Tensor) -> Tensor:
    # Half-precision input is worked on in float32 (METHOD: K and V in float32); float64 input keeps its precision.
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class FullResult:
    filtered: list[Tensor]  # per part [n_i, T, C], the working dtype
    before: Tensor  # [n, r] singular values (NaN for a non-finite matrix)
    after: Tensor  # [n, r] the same after the chain
    needed: Tensor  # [n] long: the leading basis columns each matrix's rebuild needs (0 when it passes through)
    width: int  # the columns the rebuild used: exact for every matrix with needed <= width


def _filter_full(parts: list[Tensor], originals: list[Tensor], chains: list[tuple[tuple[Step, ...], int]],
                 allow_float64: bool, width: int | None = None, sync: bool = False) -> FullResult:
    """The full decomposition of every matrix of the stacked parts (worked copies of `originals`), then each row
    group's chain.

    chains: (steps, rows) in order, covering the parts' batch. The rebuild takes the leading `width` basis columns
    (bounded by what the chains' fixed/quantile steps keep): inside sampling the previous step's need plus a
    margin, checked by the caller through `needed`; with `sync` (a complete call outside sampling) exactly what
    the matrices need, read on the host. Otherwise no host sync.
    """
    r = min(parts[0].shape[-2], parts[0].shape[-1])
    before, basis, tall, finite = _gram_eigen(parts, allow_float64)
    afters, factors = [], []
    start = 0
    for steps, rows in chains:
        after, factor = chain_factors(before[start:start + rows], steps)
        afters.append(after)
        factors.append(factor)
        start += rows
    after, factor = torch.cat(afters), torch.cat(factors)
    # Nothing changed (fixed N >= r, energy 1.0): the input as it was, not a rounding-perturbed rebuild. A
    # non-finite matrix has no spectrum: it passes through untouched (values reported as NaN) instead of
    # poisoning the batch.
    passes = (factor == 1).all(-1) | ~finite
    position = torch.arange(1, r + 1, device=factor.device)
    needed = torch.where(passes, 0, ((factor != 0) * position).amax(-1))
    static = max(prefix_width(steps, r) for steps, _ in chains)
    if sync:
        width = int(needed.max())
    width = static if width is None else max(1, min(width, static))
    filtered, offset = [], 0
    for part, original in zip(parts, originals, strict=True):
        own = slice(offset, offset + part.shape[0])
        offset = own.stop
        rebuilt = _rebuild_from_basis(part, basis[own], factor[own], tall, width)
        filtered.append(_where_into(rebuilt, passes[own, None, None], original.to(rebuilt.dtype), rebuilt))
    nan = torch.full_like(before, float("nan"))
    before = torch.where(finite[:, None], before, nan)
    after = torch.where(finite[:, None], after, nan)
    return FullResult(filtered=filtered, before=before, after=after, needed=needed, width=width)


# ---------------------------------------------------------------------------------------------
# The iterative route for truncation chains that keep few values
# ---------------------------------------------------------------------------------------------


def _truncation_counts(values: Tensor, total: Tensor, steps: tuple[Step, ...], r: int) -> tuple[Tensor, Tensor]:
    """How many leading values a pure truncation chain keeps, from the top-p values [n, p] and the total energy
    ||X||_F^2 [n] (float64): (count [n], determined [n] bool). An energy step is determined when its threshold
    is met inside the block; otherwise (or for a count beyond the block) the full decomposition must decide."""
    count_rows, block = values.shape
    prefix = values.to(total.dtype).square().cumsum(-1)
    position = torch.arange(1, block + 1, device=values.device)
    count = torch.full((count_rows,), r, dtype=torch.long, device=values.device)
    determined = torch.ones(count_rows, dtype=torch.bool, device=values.device)
    for step in steps:
        static = _static_count(step, r)
        if static is not None:
            count = count.clamp_max(static)
            continue
        if step.value >= 1.0:
            continue  # energy 1 keeps everything kept so far
        inside = count <= block
        kept = torch.where(count >= r, total, prefix.gather(-1, (count.clamp(1, block) - 1)[:, None])[:, 0])
        determined &= inside | (count >= r)
        fraction = prefix / kept.clamp_min(torch.finfo(total.dtype).tiny)[:, None]
        reached = (fraction >= step.value - ENERGY_TOL) & (position <= count[:, None])
        found = reached.any(-1)
        first = reached.int().argmax(-1) + 1
        # An all-zero matrix never reaches q and keeps everything: it stays zero, whatever the block holds.
        zero = kept == 0
        determined &= found | zero
        count = torch.where(found, torch.minimum(count, first), count)
    zero = total == 0
    determined &= (count <= block) | zero
    return count.clamp_max(block), determined


# A call made outside sampling is complete and may read the host: its cold solve stops as soon as every matrix is
# certified, checked after SYNC_FIRST_GRAM_ITERATIONS on the Gram matrix, again after the rest of GRAM_ITERATIONS,
# and after one more X-level iteration; the full decomposition decides for whatever is still uncertified.
SYNC_FIRST_GRAM_ITERATIONS = 3


@dataclass(frozen=True)
class TopkResult:
    filtered: list[Tensor]  # per part [n_i, T, C], the working dtype
    basis: Tensor  # [n, m, p] right vectors of the short side, for the next step's warm start
    converged: Tensor  # [n] bool: the residual check passed and the kept count was determined
    before: Tensor  # [n, r] the block's certified leading Ritz values, then NaN (not computed)
    after: Tensor  # [n, r] the same after the chain (dropped values 0)


def _accept(top: topk.TopSingular, total: Tensor, finite: Tensor, chains: list[tuple[tuple[Step, ...], int]],
            r: int) -> tuple[Tensor, Tensor]:
    """(kept [n, p] bool: the leading pairs each matrix keeps, converged [n] bool: its kept pairs passed the
    residual check and its count was determined; a non-finite matrix passes through, which is converged)."""
    block = top.values.shape[-1]
    counts, determined = [], []
    offset = 0
    for steps, size in chains:
        count, known = _truncation_counts(top.values[offset:offset + size], total[offset:offset + size], steps, r)
        counts.append(count)
        determined.append(known)
        offset += size
    count, known = torch.cat(counts), torch.cat(determined)
    kept = torch.arange(block, device=top.values.device) < count[:, None]
    certified = ((top.residual <= top.tolerance[:, None]) | ~kept).all(-1)
    return kept, (known & certified) | ~finite


def _solve_topk(rows: list[Tensor], block: int, start: Tensor | None, allow_float64: bool, sync: bool,
                accept) -> tuple[topk.TopSingular, Tensor, Tensor]:
    """The iterative solve and its acceptance (kept, converged). Inside sampling (not sync) a fixed schedule with
    no host read; outside it (always a cold start), stages that stop at the first one certifying every matrix."""
    if not sync:
        top = topk.top_singular(rows, block, start=start, allow_float64=allow_float64)
        return (top, *accept(top))
    top = topk.top_singular(rows, block, start=start, iterations=0, allow_float64=allow_float64,
                            gram_iterations=SYNC_FIRST_GRAM_ITERATIONS)
    kept, converged = accept(top)
    # The stages' X^T X V counts as one iteration, so the Gram stages add up to GRAM_ITERATIONS.
    rest = max(0, topk.GRAM_ITERATIONS - SYNC_FIRST_GRAM_ITERATIONS - 1)
    for gram_iterations in (rest, 0):
        if bool(converged.all()):
            break
        top = topk.refine(rows, top, gram_iterations, allow_float64)
        kept, converged = accept(top)
    return top, kept, converged


def _filter_topk(parts: list[Tensor], chains: list[tuple[tuple[Step, ...], int]], block: int,
                 start: Tensor | None, allow_float64: bool, sync: bool = False) -> TopkResult:
    """Pure truncation chains by the iterative solver: X V_k V_k^T from the certified top-k pairs, for the stacked
    parts (each group's matrices, never copied into one tensor). No host sync unless `sync` (outside sampling)."""
    tall = parts[0].shape[-2] >= parts[0].shape[-1]
    r = min(parts[0].shape[-2], parts[0].shape[-1])
    # ||X||_F^2 from the rows' norms: one read of X and no full-size temporary (an [n, T, C] copy costs about
    # as much as a product with the block here). Row norms in the working dtype are accurate to u relative, and
    # accumulating them in float64 keeps the energy fractions exact to that level.
    energy_dtype = torch.float64 if allow_float64 else parts[0].dtype
    total = torch.cat([torch.linalg.vector_norm(part, dim=-1).to(energy_dtype).square().sum(-1) for part in parts])
    finite = torch.isfinite(total)
    # A non-finite matrix is not cleaned here (that would copy X): the solver keeps its NaN inside that matrix's
    # own products and small problems, and its result is replaced by the input below.
    rows = parts if tall else [part.mT for part in parts]
    top, kept, converged = _solve_topk(rows, block, start, allow_float64, sync,
                                       lambda top: _accept(top, total, finite, chains, r))
    # X V_k V_k^T, built in X's own layout (for wide X: right holds its left vectors, projected X^T U), from the
    # leading columns the chains can keep at most (known from their fixed/quantile steps and the shape).
    width = min(block, max(prefix_width(steps, r) for steps, _ in chains))
    masked = top.projected[..., :width] * kept[:, :width].to(parts[0].dtype).unsqueeze(-2)
    right = top.right[..., :width]
    filtered, offset = [], 0
    for part in parts:
        own = slice(offset, offset + part.shape[0])
        offset += part.shape[0]
        rebuilt = masked[own] @ right[own].mT if tall else right[own] @ masked[own].mT
        filtered.append(_where_into(rebuilt, finite[own, None, None], rebuilt, part))
    # The values worth reporting: the leading Ritz values up to the first whose residual check fails (those
    # after it are lower bounds still converging, not singular values).
    trusted = (top.residual <= top.tolerance[:, None]).int().cumprod(-1).bool()
    before = torch.full((total.shape[0], r), float("nan"), dtype=top.values.dtype, device=total.device)
    before[:, :block] = torch.where(trusted, top.values, torch.full_like(top.values, float("nan")))
    before = torch.where(finite[:, None], before, torch.full_like(before, float("nan")))
    after = before.clone()
    after[:, :block] = torch.where(kept, top.values, torch.zeros_like(top.values)).where(trusted, before[:, :block])
    after = torch.where(finite[:, None], after, before)
    return TopkResult(filtered=filtered, basis=top.right, converged=converged, before=before, after=after)


# ---------------------------------------------------------------------------------------------
# The value object
# ---------------------------------------------------------------------------------------------


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


def _check_matrices(x: Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"Spectrum expects matrices shaped [n, T, C], got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"Spectrum expects a floating-point tensor, got {x.dtype}.")


@dataclass(frozen=True)
class Spectrum:
    """An immutable chain of spectral filter steps (the SPECTRUM value of the nodes).

    Calling it on float matrices x [n, T, C] filters each x[i] independently and returns the
    same shape and dtype. The empty chain is the identity and returns x itself at no cost.

    method "exact" (default): the result agrees with the definition applied to a float64 SVD of the same input
    within the bound of docs/precision.md. Pure truncation chains that keep few values use a certified
    iterative top-k solver (attention/topk.py) and fall back to the full decomposition for any matrix whose
    residual check fails; everything else decomposes through the Gram matrix's eigenproblem, in float64 where
    the device has it. Half-precision input is computed in float32.
    method "lowrank" is an explicit approximation: torch.svd_lowrank with q = (what the chain's
    fixed/quantile steps keep) + LOWRANK_OVERSAMPLING columns and LOWRANK_NITER power
    iterations; the chain then runs on those q values, as if the matrix were its rank-q
    approximation (energy fractions and reweighting norms are relative to that).

    allow_float64 (call argument): None uses float64 where the device has it (not on MPS); False forces the
    float32-only path, as on such a device.
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

    def uses_topk(self, tokens: int, channels: int) -> bool:
        """Whether matrices of this shape go through the iterative top-k solver."""
        return self.method == "exact" and topk_block(self.steps, min(tokens, channels)) is not None

    def __call__(self, x: Tensor, allow_float64: bool | None = None) -> Tensor:
        if self.is_identity:
            return x
        _check_matrices(x)
        if x.numel() == 0:
            return x.clone()
        r = min(x.shape[-2], x.shape[-1])
        if self.method == "exact" and keeps_everything(self.steps, r):
            return x  # fixed N >= r, quantile 1, energy 1: nothing to remove
        if self.method == "lowrank":
            return self._filter_lowrank(x)[0]
        return filter_groups([(self, x)], allow_float64=allow_float64)[0]

    def filter_with_values(self, x: Tensor, allow_float64: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(filtered x, singular values before [n, r], after [n, r]); values in float32,
        descending by the 'before' values, for plotting what the chain did (always the full decomposition)."""
        _check_matrices(x)
        n, tokens, channels = x.shape
        r = min(tokens, channels)
        if x.numel() == 0:
            empty = torch.zeros(n, r, dtype=torch.float32, device=x.device)
            return x.clone(), empty, empty.clone()
        if self.method == "lowrank":
            filtered, before, after = self._filter_lowrank(x)
        else:
            float64 = has_float64(x.device) if allow_float64 is None else allow_float64
            full = _filter_full([_work_copy(x)], [x], [(self.steps, n)], float64)
            filtered, before, after = full.filtered[0], full.before, full.after
        return filtered.to(x.dtype), before.to(x.device, torch.float32), after.to(x.device, torch.float32)

    def _filter_lowrank(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        work = _work_copy(x)
        r = min(x.shape[-2], x.shape[-1])
        finite = torch.isfinite(work).flatten(1).all(1)
        clean = torch.where(finite[:, None, None], work, torch.zeros_like(work))
        columns = _lowrank_columns(self.steps, r)
        # A fixed seed in a forked RNG: the randomized range finder must neither make sampling
        # irreproducible nor consume the caller's random stream.
        devices = [clean.device] if clean.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=clean.device.type):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(clean, q=columns, niter=LOWRANK_NITER)
        s = s.double()
        padded = torch.zeros(clean.shape[0], r, dtype=torch.float64, device=clean.device)
        padded[:, :columns] = s
        after = apply_chain_values(padded, self.steps)
        rebuilt = (u * after[:, :columns].to(u.dtype).unsqueeze(-2)) @ v.mT
        keep = ~finite
        filtered = torch.where(keep[:, None, None], x.to(rebuilt.dtype), rebuilt)
        nan = torch.full_like(padded, float("nan"))
        before = torch.where(keep[:, None], nan, padded)
        after = torch.where(keep[:, None], nan, after)
        return filtered.to(x.dtype), before, after


# ---------------------------------------------------------------------------------------------
# Batched filtering of several matrix groups (all anchors, chunks, K and V of one layer call)
# ---------------------------------------------------------------------------------------------


# Columns the full route's rebuild adds at least to the previous step's need (see width_hint).
WIDTH_MARGIN = 16


def width_hint(needed: int) -> int:
    """The rebuild width for the next step of a layer whose full-route rebuild needed `needed` columns: a margin
    for a spectrum that changes step to step, still far below the full width for the few values a truncation
    after a reweighting keeps."""
    return needed + max(WIDTH_MARGIN, needed // 2)


class SolverState:
    """Per-run scratch of the spectrum solver (lives on the sampling run, dropped when it ends).

    bases: the last right basis per slot (a layer call's identity: layer, chunk layout), for warm starts.
    widths: the full route's rebuild width per slot, from the previous step's need.
    pending, pending_widths: this model call's convergence flags and rebuild needs, settled once per model call.
    full_slots: slots whose matrices did not converge once in this run; they use the full decomposition.
    """

    def __init__(self) -> None:
        self.bases: dict[object, Tensor] = {}
        self.widths: dict[object, int] = {}
        self.pending: list[tuple[object, Tensor]] = []
        self.pending_widths: list[tuple[object, Tensor, int]] = []
        self.full_slots: set[object] = set()

    def settle(self) -> list[object]:
        """The slots of this model call whose result is not exact (one host read for all of them): an iterative
        solve that did not converge (the slot switches to the full decomposition for the rest of the run and its
        basis is dropped) or a full-route rebuild that needed more columns than it took (the next width covers
        them). Every slot's next width follows from what it needed."""
        pending, self.pending = self.pending, []
        widths, self.pending_widths = self.pending_widths, []
        if not pending and not widths:
            return []
        read = torch.stack([flag.all().long() for _, flag in pending] + [needed for _, needed, _ in widths]).tolist()
        flags, needs = read[:len(pending)], read[len(pending):]
        failed = [slot for (slot, _), ok in zip(pending, flags, strict=True) if not ok]
        for slot in failed:
            self.full_slots.add(slot)
            self.bases.pop(slot, None)
        for (slot, _, used), needed in zip(widths, needs, strict=True):
            self.widths[slot] = width_hint(needed)
            if needed > used:
                failed.append(slot)
        return failed

    def discard_pending(self) -> None:
        """Forget what an unfinished model call left to settle (flags and needs alike), before the next one."""
        self.pending.clear()
        self.pending_widths.clear()

    def clear(self) -> None:
        self.bases.clear()
        self.widths.clear()
        self.pending.clear()
        self.pending_widths.clear()
        self.full_slots.clear()


@dataclass(frozen=True)
class FilteredGroup:
    """One group's result: the filtered matrices (input shape and dtype) and the singular values the filter
    computed on the way, before and after its chain, [n, r] descending, or None when nothing was decomposed
    (identity, or a chain that keeps everything). The iterative solver computes only leading values (those whose
    residual check passed): the rest are NaN."""

    x: Tensor
    before: Tensor | None = None
    after: Tensor | None = None


def filter_groups(groups: list[tuple[Spectrum | None, Tensor]], state: SolverState | None = None,
                  slot: object = None, allow_float64: bool | None = None) -> list[Tensor]:
    """Filter several [n_i, T, C] groups, each with its own chain (None = unchanged), in as few batched
    decompositions as their routes allow: one for all iterative-route groups, one for all full-route groups.

    Without `state` the call is complete: matrices whose iterative solve fails its residual check are redone by
    the full decomposition right here (this reads the flags on the host). With `state` (inside sampling) nothing
    is read on the host: the flags go to state.pending and the caller settles them once per model call, redoing
    the call if any failed; the right bases are kept for the next step's warm start under `slot`.
    """
    return [group.x for group in filter_groups_with_values(groups, state, slot, allow_float64)]


def filter_groups_with_values(groups: list[tuple[Spectrum | None, Tensor]], state: SolverState | None = None,
                              slot: object = None, allow_float64: bool | None = None) -> list[FilteredGroup]:
    """filter_groups, keeping the singular values each group's decomposition produced (for recording)."""
    results: list[FilteredGroup | None] = [None] * len(groups)
    routes: dict[str, list[int]] = {"topk": [], "full": []}
    blocks = []
    for index, (spectrum, x) in enumerate(groups):
        if spectrum is None or spectrum.is_identity:
            results[index] = FilteredGroup(x)
            continue
        _check_matrices(x)
        r = min(x.shape[-2], x.shape[-1])
        if x.numel() == 0:
            results[index] = FilteredGroup(x.clone())
        elif spectrum.method == "lowrank":
            results[index] = FilteredGroup(*spectrum._filter_lowrank(x))
        elif keeps_everything(spectrum.steps, r):
            results[index] = FilteredGroup(x)
        else:
            block = topk_block(spectrum.steps, r)
            if block is None or (state is not None and slot in state.full_slots):
                routes["full"].append(index)
            else:
                routes["topk"].append(index)
                blocks.append(block)
    shapes = {groups[i][1].shape[1:] for i in routes["topk"] + routes["full"]}
    dtypes = {groups[i][1].dtype for i in routes["topk"] + routes["full"]}
    if len(shapes) > 1 or len(dtypes) > 1:
        # Different shapes or dtypes cannot share one batch: each group alone (still no host sync).
        for index in routes["topk"] + routes["full"]:
            results[index] = filter_groups_with_values([groups[index]], state, (slot, index), allow_float64)[0]
        return results
    for route, members in routes.items():
        if not members:
            continue
        chains = [(groups[i][0].steps, groups[i][1].shape[0]) for i in members]
        device = groups[members[0]][1].device
        float64 = has_float64(device) if allow_float64 is None else allow_float64
        originals = [groups[i][1] for i in members]
        parts = [_work_copy(original) for original in originals]
        if route == "full":
            hint = state.widths.get(slot) if state is not None else None
            full = _filter_full(parts, originals, chains, float64, width=hint, sync=state is None)
            if state is not None:
                state.pending_widths.append((slot, full.needed.amax(), full.width))
            filtered, before, after = full.filtered, full.before, full.after
        else:
            filtered, before, after = _topk_route(parts, originals, chains, max(blocks), state, slot, float64)
        offset = 0
        for i, part in zip(members, filtered, strict=True):
            own = slice(offset, offset + part.shape[0])
            offset = own.stop
            results[i] = FilteredGroup(part.to(groups[i][1].dtype), before[own], after[own])
    return results


def _topk_route(parts: list[Tensor], originals: list[Tensor], chains: list[tuple[tuple[Step, ...], int]],
                block: int, state: SolverState | None, slot: object,
                allow_float64: bool) -> tuple[list[Tensor], Tensor, Tensor]:
    """The iterative route for one batch of parts: (filtered per part, before, after). With state: warm-started,
    its convergence left pending; without: complete, the full decomposition redoing what is uncertified."""
    start = None
    if state is not None:
        previous = state.bases.get(slot)
        if previous is not None and previous.shape == (sum(p.shape[0] for p in parts), r_side(parts[0]), block):
            start = previous
    result = _filter_topk(parts, chains, block, start, allow_float64, sync=state is None)
    filtered, before, after = result.filtered, result.before, result.after
    if state is not None:
        state.bases[slot] = result.basis.detach()
        state.pending.append((slot, result.converged))
        return filtered, before, after
    redo = ~result.converged
    if bool(redo.any()):
        # Not certified: the full decomposition decides for those matrices (never a silent approximation).
        chosen = torch.cat(originals)[redo]
        full = _filter_full([_work_copy(chosen)], [chosen], _rows_of(chains, redo), allow_float64, sync=True)
        before, after = before.clone(), after.clone()
        before[redo] = full.before.to(before.dtype)
        after[redo] = full.after.to(after.dtype)
        rows = [(part, row) for part in filtered for row in range(part.shape[0])]
        redone = [rows[index] for index, again in enumerate(redo.tolist()) if again]
        for (part, row), matrix in zip(redone, full.filtered[0], strict=True):
            part[row] = matrix
    return filtered, before, after


def r_side(x: Tensor) -> int:
    """The short side of matrices [n, T, C]: the length of the right basis the solver keeps."""
    return min(x.shape[-2], x.shape[-1])


def _rows_of(chains: list[tuple[tuple[Step, ...], int]], selected: Tensor) -> list[tuple[tuple[Step, ...], int]]:
    """The chains of the selected rows (host-side; only used on the synchronous fallback)."""
    picked = selected.tolist()
    out, offset = [], 0
    for steps, rows in chains:
        count = sum(picked[offset:offset + rows])
        if count:
            out.append((steps, count))
        offset += rows
    return out
