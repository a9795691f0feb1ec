"""The top singular triplets of a batch of matrices by two-sided subspace iteration, with a residual check.

Used for truncation chains that keep few values: computing the p << r leading singular pairs costs a few
[T, C] x [C, p] products instead of a dense eigensolver (latency-bound on a GPU). From scratch, the block first
iterates on the Gram matrix X^T X (cheap products); the iterations that follow, the residuals and the final
Rayleigh-Ritz step work with X itself, orthonormalise by Householder QR (backward stable column by column) and
solve the small p x p problem in float64 where the device has it. So rounding in the result enters at the level
of X (unit roundoff u x ||X||), as in a backward-stable SVD, not at the level of X^T X (u x ||X||^2).

The result is certified, not assumed: each Ritz pair's residual ||X^T u_i - s_i v_i|| is returned, and the
caller accepts the pairs only when the residual is below RESIDUAL_TOLERANCE x u x s_1; by the gap theorems
(Wedin) the kept subspace is then as accurate as a float32 SVD's up to that factor. Nothing here reads a
tensor value on the host: iteration counts and sizes come from shapes, so the hot path never synchronises.
Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Accept a Ritz pair when ||X^T u_i - s_i v_i|| <= RESIDUAL_TOLERANCE * u * s_1 (u: unit roundoff of the working
# dtype, s_1 the largest Ritz value). The rounding floor of the residual itself, measured in float32 at SDXL
# sizes after many iterations, is 2-6 u s_1; 64 leaves room for it and still certifies a subspace as good as a
# float32 SVD's within that factor.
RESIDUAL_TOLERANCE = 64.0
# X-level iterations without a previous basis (after the Gram iterations below, from a seeded Gaussian block) and
# with one (the same anchor, layer and chunk at the previous step, whose subspace moves little step to step).
COLD_ITERATIONS = 1
WARM_ITERATIONS = 2
# From scratch, the iteration first runs on the float32 Gram matrix X^T X (cheap products, squared rounding).
GRAM_ITERATIONS = 10
# Columns beyond the values kept: the convergence factor per iteration is (s_{p+1} / s_k)^2.
MIN_OVERSAMPLING = 16
# The Gram matrix is built from this many column blocks, only those on and above the diagonal multiplied.
GRAM_COLUMN_BLOCKS = 4
# The iteration pays off only when the block is a small part of the spectrum.
MAX_BLOCK_FRACTION = 0.25
START_SEED = 0


def block_size(keep_bound: int, rank: int) -> int | None:
    """Columns of the iteration for a chain that keeps at most keep_bound of rank values, or None when the
    block would not be small enough to beat the full decomposition."""
    block = min(rank, max(2 * keep_bound, keep_bound + MIN_OVERSAMPLING))
    if block > MAX_BLOCK_FRACTION * rank:
        return None
    return block


@dataclass
class TopSingular:
    """The leading p singular triplets of each matrix, as Ritz approximations with their residuals.

    values [n, p] descending (working dtype); right [n, m, p] orthonormal columns (m = the short side);
    projected [n, L, p] = X right (so X right_k right_k^T = projected_k right_k^T); residual [n, p] =
    ||X^T u_i - s_i v_i||; tolerance [n]: the residual a certified pair may have.
    """

    values: Tensor
    right: Tensor
    projected: Tensor
    residual: Tensor
    tolerance: Tensor


def _small_dtype(work_dtype: torch.dtype, allow_float64: bool) -> torch.dtype:
    return torch.float64 if allow_float64 else work_dtype


def _finite(small: Tensor) -> Tensor:
    # A matrix with NaN or inf entries is carried through its own products unchanged (the caller replaces its
    # result); only the small eigenproblem and SVD, iterative solvers that could fail on them, must not see them.
    return torch.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)


def _orthonormal(y: Tensor) -> Tensor:
    """Orthonormal columns spanning y [n, L, p] by a Householder QR in y's own dtype.

    Householder QR is backward stable column by column (Q R = y + E with ||e_j|| <= c u ||y_j||), so the span
    is as accurate as y's columns themselves whatever their conditioning: the iteration's columns have norms
    spread like the singular values, which scaled or Gram-based orthonormalisation would have to repair. A
    rank-deficient y still gives orthonormal columns; the directions it lacks carry Ritz value zero. (NaN in y
    only propagates through the reflections of its own matrix: QR has no iteration that could fail.)
    """
    return torch.linalg.qr(y).Q


def _gram(x: Tensor) -> Tensor:
    """x^T x for x [n, L, m], multiplying only the column blocks on and above the diagonal (G is symmetric)."""
    size = x.shape[-1]
    edges = [size * block // GRAM_COLUMN_BLOCKS for block in range(GRAM_COLUMN_BLOCKS + 1)]
    gram = torch.empty(x.shape[0], size, size, dtype=x.dtype, device=x.device)
    for low, high in zip(edges, edges[1:], strict=False):
        gram[:, low:high, low:] = x[..., low:high].mT @ x[..., low:]
        gram[:, high:, low:high] = gram[:, low:high, high:].mT
    return gram


def _start_block(matrix_count: int, size: int, block: int, like: Tensor) -> Tensor:
    # A seeded generator of its own: the start must neither consume the caller's random stream nor vary run to run.
    generator = torch.Generator(device=like.device).manual_seed(START_SEED)
    return torch.randn(matrix_count, size, block, generator=generator, device=like.device, dtype=like.dtype)


def top_singular(x: Tensor, block: int, start: Tensor | None = None, iterations: int | None = None,
                 allow_float64: bool = True) -> TopSingular:
    """The `block` leading singular triplets of each x[i] (x [n, L, m] with L >= m: tall; transpose wide input).

    start: an [n, m, block] basis to begin from (the previous step's right vectors), else a seeded Gaussian block.
    """
    count, _, size = x.shape
    small = _small_dtype(x.dtype, allow_float64)
    if start is None:
        right = _orthonormal(_start_block(count, size, block, x))
        iterations = COLD_ITERATIONS if iterations is None else iterations
        if iterations > 0:
            # From scratch the block needs many iterations on spectra that decay slowly (power laws): run them
            # on the float32 Gram matrix, where each costs an [m, m] x [m, p] product, then let the X-level
            # iterations below remove the Gram's squared rounding from the subspace.
            gram = _gram(x)
            for _ in range(GRAM_ITERATIONS):
                right = _orthonormal(gram @ right)
    else:
        right = _orthonormal(start.to(x.device, x.dtype))
        iterations = WARM_ITERATIONS if iterations is None else iterations
    for _ in range(iterations):
        left = _orthonormal(x @ right)
        right = _orthonormal(x.mT @ left)
    # Rayleigh-Ritz on X restricted to span(right): the SVD of the small X right through its p x p Gram (float64:
    # the squaring then costs nothing against float32's rounding of X right itself).
    projected = x @ right
    if small == torch.float64:
        wide = projected.to(small)
        eigenvalues, rotation = torch.linalg.eigh(_finite(wide.mT @ wide))
        eigenvalues = eigenvalues.flip(-1).clamp_min(0)
        rotation = rotation.flip(-1)
        values = eigenvalues.sqrt()
    else:
        # No float64: squaring X right in float32 would cost its small values' accuracy (u ||X||^2 / s_i), so
        # the small SVD goes through a Householder QR and the p x p triangle's own SVD instead.
        triangle = torch.linalg.qr(_finite(projected), mode="r").R
        _, values, rotation_t = torch.linalg.svd(triangle)
        rotation = rotation_t.mT
        eigenvalues = values.square()
    rotation_work = rotation.to(x.dtype)
    right = right @ rotation_work
    projected = projected @ rotation_work
    # ||X^T (X v_i) - s_i^2 v_i|| / s_i = ||X^T u_i - s_i v_i||, the residual the gap theorems take.
    back = x.mT @ projected - right * eigenvalues.to(x.dtype).unsqueeze(-2)
    gram_residual = torch.linalg.vector_norm(back, dim=-2).to(small)
    residual = gram_residual / values.clamp_min(torch.finfo(small).tiny)
    residual = torch.where(values > 0, residual, gram_residual)
    unit = torch.finfo(x.dtype).eps / 2
    tolerance = RESIDUAL_TOLERANCE * unit * values[..., 0]
    return TopSingular(values=values, right=right, projected=projected, residual=residual, tolerance=tolerance)
