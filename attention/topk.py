"""The top singular triplets of a batch of matrices by block subspace iteration, with a residual check.

Used for truncation chains that keep few values: computing the p << r leading singular pairs costs a few
[T, C] x [C, p] products instead of a dense eigensolver (latency-bound on a GPU). From scratch, the block first
iterates on the Gram matrix X^T X (cheap products); the iterations that follow apply X^T (X V) as two products
with X itself, orthonormalise by Householder QR (backward stable column by column), and the Rayleigh-Ritz step
solves the small p x p problem in float64 where the device has it. So rounding in the result enters at the
level of X (unit roundoff u x ||X||), as in a backward-stable SVD, not at the level of X^T X (u x ||X||^2).
The Rayleigh-Ritz step's second product is also the next iteration's, so a caller that may read the host
(outside sampling) can check the residuals and continue (refine) at no extra cost.

The result is certified, not assumed: each Ritz pair's residual ||X^T u_i - s_i v_i|| is returned, and the
caller accepts the pairs only when the residual is below RESIDUAL_TOLERANCE x u x s_1; by the gap theorems
(Wedin) the kept subspace is then as accurate as a float32 SVD's up to that factor. Nothing here reads a
tensor value on the host: iteration counts and sizes come from the caller and the shapes.
Plain PyTorch; never imports comfy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .device import dense_linalg_device

# Accept a Ritz pair when ||X^T u_i - s_i v_i|| <= RESIDUAL_TOLERANCE * u * s_1 (u: unit roundoff of the working
# dtype, s_1 the largest Ritz value). The rounding floor of the residual itself, measured in float32 at SDXL
# sizes after 30 iterations on clean-gap and power-law spectra, is 3-11 u s_1; 64 leaves room for it and still
# certifies a subspace as good as a float32 SVD's within that factor.
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

# Matrices [n, L, m] as one tensor or as parts stacked along the batch (the groups of one layer call).
Rows = Tensor | Sequence[Tensor]


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
    ||X^T u_i - s_i v_i||; tolerance [n]: the residual a certified pair may have; normal [n, m, p] = X^T X right;
    gram: the float32 X^T X of a cold start (None after a warm one), for refine.
    """

    values: Tensor
    right: Tensor
    projected: Tensor
    residual: Tensor
    tolerance: Tensor
    normal: Tensor
    gram: Tensor | None = None


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
    solver = dense_linalg_device(y.device)
    return torch.linalg.qr(y.to(solver)).Q.to(y.device)


def _parts(x: Rows) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _count(parts: list[Tensor]) -> int:
    return sum(part.shape[0] for part in parts)


def _apply(parts: list[Tensor], block: Tensor, transposed: bool = False) -> Tensor:
    """X @ block (or X^T @ block) for the stacked parts, one product per part: the parts are never copied into one
    tensor (on the CPU, a fresh allocation of that size costs as much as the products with the block)."""
    pieces, start = [], 0
    for part in parts:
        stop = start + part.shape[0]
        pieces.append((part.mT if transposed else part) @ block[start:stop])
        start = stop
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _gram(x: Rows) -> Tensor:
    """x^T x for x [n, L, m], multiplying only the column blocks on and above the diagonal (G is symmetric)."""
    parts = _parts(x)
    size = parts[0].shape[-1]
    edges = [size * block // GRAM_COLUMN_BLOCKS for block in range(GRAM_COLUMN_BLOCKS + 1)]
    gram = torch.empty(_count(parts), size, size, dtype=parts[0].dtype, device=parts[0].device)
    start = 0
    for part in parts:
        rows = gram[start:start + part.shape[0]]
        for low, high in zip(edges, edges[1:], strict=False):
            rows[:, low:high, low:] = part[..., low:high].mT @ part[..., low:]
            rows[:, high:, low:high] = rows[:, low:high, high:].mT
        start += part.shape[0]
    return gram


def _start_block(matrix_count: int, size: int, block: int, like: Tensor) -> Tensor:
    # A seeded generator of its own: the start must neither consume the caller's random stream nor vary run to run.
    generator = torch.Generator(device=like.device).manual_seed(START_SEED)
    return torch.randn(matrix_count, size, block, generator=generator, device=like.device, dtype=like.dtype)


def top_singular(x: Rows, block: int, start: Tensor | None = None, iterations: int | None = None,
                 allow_float64: bool = True, gram_iterations: int = GRAM_ITERATIONS) -> TopSingular:
    """The `block` leading singular triplets of each matrix of x [n, L, m] with L >= m (tall; transpose wide
    input), given as one tensor or as parts stacked along the batch.

    start: an [n, m, block] basis to begin from (the previous step's right vectors), else a seeded Gaussian block,
    which first takes gram_iterations on the Gram matrix. iterations: X-level iterations before the Rayleigh-Ritz
    step (COLD_ITERATIONS or WARM_ITERATIONS if None).
    """
    parts = _parts(x)
    gram = None
    if start is None:
        first = parts[0]
        # A Gaussian block is well conditioned and G Omega spans what G orth(Omega) does: no QR before the first
        # Gram iteration.
        right = _start_block(_count(parts), first.shape[-1], block, first)
        if gram_iterations == 0:
            right = _orthonormal(right)
        iterations = COLD_ITERATIONS if iterations is None else iterations
        # From scratch the block needs many iterations on spectra that decay slowly (power laws): run them on the
        # float32 Gram matrix, where each costs an [m, m] x [m, p] product, then let the X-level steps below remove
        # the Gram's squared rounding from the subspace.
        gram = _gram(parts)
        for _ in range(gram_iterations):
            right = _orthonormal(gram @ right)
    else:
        right = _orthonormal(start.to(parts[0].device, parts[0].dtype))
        iterations = WARM_ITERATIONS if iterations is None else iterations
    for _ in range(iterations):
        # X^T (X V) as two products with X, never through a Gram: each is backward stable at the level of X, so the
        # subspace's error is u ||X|| / gap (Wedin), where a Gram's rounding would give u ||X||^2 / gap^2.
        right = _orthonormal(_apply(parts, _apply(parts, right), transposed=True))
    return _rayleigh_ritz(parts, right, allow_float64, gram)


def refine(x: Rows, top: TopSingular, gram_iterations: int = 0, allow_float64: bool = True) -> TopSingular:
    """Continue the iteration of a previous result: the X^T X V it computed is one iteration; gram_iterations more
    run on its Gram matrix (a cold result keeps it), then the Rayleigh-Ritz step again (two products with X)."""
    right = _orthonormal(top.normal)
    if gram_iterations and top.gram is None:
        raise ValueError("refine: gram_iterations need the Gram matrix of a cold start")
    for _ in range(gram_iterations):
        right = _orthonormal(top.gram @ right)
    return _rayleigh_ritz(_parts(x), right, allow_float64, top.gram)


def _rayleigh_ritz(parts: list[Tensor], right: Tensor, allow_float64: bool, gram: Tensor | None) -> TopSingular:
    """Ritz triplets of X on span(right) and their residuals."""
    dtype = right.dtype
    small = _small_dtype(dtype, allow_float64)
    # The SVD of the small X right through its p x p Gram (float64: the squaring then costs nothing against
    # float32's rounding of X right itself).
    projected = _apply(parts, right)
    device, solver = projected.device, dense_linalg_device(projected.device)
    if small == torch.float64:
        wide = projected.to(small)
        eigenvalues, rotation = torch.linalg.eigh(_finite(wide.mT @ wide).to(solver))
        eigenvalues = eigenvalues.flip(-1).clamp_min(0)
        rotation = rotation.flip(-1)
        values = eigenvalues.sqrt()
    else:
        # No float64: squaring X right in float32 would cost its small values' accuracy (u ||X||^2 / s_i), so
        # the small SVD goes through a Householder QR and the p x p triangle's own SVD instead.
        triangle = torch.linalg.qr(_finite(projected).to(solver), mode="r").R
        _, values, rotation_t = torch.linalg.svd(triangle)
        rotation = rotation_t.mT
        eigenvalues = values.square()
    values, eigenvalues = values.to(device), eigenvalues.to(device)
    rotation_work = rotation.to(device, dtype)
    # X^T X v_i: the residuals' product, and the next iteration's if the caller refines.
    normal = _apply(parts, projected, transposed=True) @ rotation_work
    right = right @ rotation_work
    projected = projected @ rotation_work
    # ||X^T (X v_i) - s_i^2 v_i|| / s_i = ||X^T u_i - s_i v_i||, the residual the gap theorems take.
    back = normal - right * eigenvalues.to(dtype).unsqueeze(-2)
    gram_residual = torch.linalg.vector_norm(back, dim=-2).to(small)
    residual = gram_residual / values.clamp_min(torch.finfo(small).tiny)
    residual = torch.where(values > 0, residual, gram_residual)
    unit = torch.finfo(dtype).eps / 2
    tolerance = RESIDUAL_TOLERANCE * unit * values[..., 0]
    return TopSingular(values=values, right=right, projected=projected, residual=residual, tolerance=tolerance,
                       normal=normal, gram=gram)
