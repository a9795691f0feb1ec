"""The top singular triplets of a batch of matrices by two-sided subspace iteration, with a residual check.

Used for truncation chains that keep few values: computing the p << r leading singular pairs costs a few
[T, C] x [C, p] products instead of a Gram matrix and a dense eigensolver (latency-bound on a GPU). Every
product is with X itself, never with a squared Gram matrix, and every orthonormalisation and the final
Rayleigh-Ritz step run on small p x p problems in float64 where the device has it. So rounding enters at the
level of X (unit roundoff u x ||X||), as in a backward-stable SVD, not at the level of X^T X (u x ||X||^2).

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


def _orthonormal(y: Tensor, small: torch.dtype) -> Tensor:
    """Orthonormal columns spanning y [n, L, p] (SVQB): y W diag(lambda)^-1/2 from the eigenvectors of y^T y.

    Robust to rank deficiency, unlike Cholesky-QR: directions whose Gram eigenvalue is below the rounding floor
    become zero columns (they carry nothing; the Rayleigh-Ritz step gives them value zero).
    """
    wide = y.to(small)
    gram = wide.mT @ wide
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    floor = y.shape[-1] * torch.finfo(small).eps * eigenvalues[..., -1:].clamp_min(0)
    keep = eigenvalues > floor.clamp_min(torch.finfo(small).tiny)
    scale = torch.where(keep, eigenvalues.clamp_min(torch.finfo(small).tiny).rsqrt(), torch.zeros_like(eigenvalues))
    return (wide @ (eigenvectors * scale.unsqueeze(-2))).to(y.dtype)


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
        right = _orthonormal(_start_block(count, size, block, x), small)
        iterations = COLD_ITERATIONS if iterations is None else iterations
        if iterations > 0:
            # From scratch the block needs many iterations on spectra that decay slowly (power laws): run them
            # on the float32 Gram matrix, where each costs an [m, m] x [m, p] product, then let the X-level
            # iterations below remove the Gram's squared rounding from the subspace.
            gram = x.mT @ x
            for _ in range(GRAM_ITERATIONS):
                right = _orthonormal(gram @ right, small)
    else:
        right = _orthonormal(start.to(x.device, x.dtype), small)
        iterations = WARM_ITERATIONS if iterations is None else iterations
    for _ in range(iterations):
        left = _orthonormal(x @ right, small)
        right = _orthonormal(x.mT @ left, small)
    # Rayleigh-Ritz on X restricted to span(right): the SVD of the small X right through its p x p Gram (float64:
    # the squaring then costs nothing against float32's rounding of X right itself).
    projected = x @ right
    if small == torch.float64:
        wide = projected.to(small)
        eigenvalues, rotation = torch.linalg.eigh(wide.mT @ wide)
        eigenvalues = eigenvalues.flip(-1).clamp_min(0)
        rotation = rotation.flip(-1)
        values = eigenvalues.sqrt()
    else:
        # No float64: squaring X right in float32 would cost its small values' accuracy (u ||X||^2 / s_i), so
        # the small SVD goes through a Householder QR and the p x p triangle's own SVD instead.
        triangle = torch.linalg.qr(projected, mode="r").R
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
