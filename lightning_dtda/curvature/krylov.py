"""Krylov methods on a symmetric positive semi-definite operator known only by its products.

Both take ``K`` right-hand sides at once and run ``K`` independent recurrences in lockstep, so each
iteration costs one product with a ``[P, K]`` block: on a GGN, one pass over the data for all
queries together. They are written here rather than taken from curvlinops because the ones it
forwards to (GPyTorch's ``linear_cg``) stop early or stall with their defaults, show no progress,
and do not report residuals (measured: a default tolerance of 1.0 stops after ~10 iterations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

MatMat = Callable[[Tensor], Tensor]
# Lanczos steps between convergence checks.
_CHECK_EVERY = 5


def conjugate_gradients(
    matmat: MatMat,
    rhs: Tensor,
    precondition: MatMat | None = None,
    tolerance: float = 1e-5,
    max_iterations: int = 500,
    progress: bool = False,
    desc: str = "block conjugate gradients",
) -> tuple[Tensor, int, Tensor]:
    """Solve ``A X = rhs`` for ``rhs [P, K]`` by breakdown-free block (preconditioned) conjugate gradients.

    All columns share one Krylov space, which grows by up to ``K`` directions per product, so related
    right-hand sides (query gradients) converge in fewer iterations than one at a time. Directions
    that become linearly dependent (converged columns) are dropped by a rank-revealing
    orthonormalisation (Ji and Li, BIT 2017), which is what keeps block CG from breaking down.

    Args:
        matmat: ``V [P, r] -> A V``, ``A`` symmetric positive definite.
        rhs: Right-hand sides ``[P, K]``.
        precondition: ``R [P, K] -> M R`` with ``M`` symmetric positive definite, close to ``A^-1``.
        tolerance: Stop when every column's residual ``|rhs - A x| / |rhs|`` is below this.
        max_iterations: Stop after this many products.

    Returns:
        ``X [P, K]``, the number of products taken, and each column's relative residual ``[K]``
        recomputed from one more product (the recurrence's residual drifts from the true one).
    """
    precondition = precondition or (lambda r: r)
    scale = rhs.norm(dim=0).clamp(min=torch.finfo(rhs.dtype).tiny)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = _orthonormal(precondition(r))
    iterations = 0
    with tqdm(desc=desc, total=max_iterations, disable=not progress, leave=False) as bar:
        while p.shape[1] and iterations < max_iterations:
            ap = matmat(p)
            iterations += 1
            pap = p.T @ ap
            pap = (pap + pap.T) / 2
            alpha = torch.linalg.solve(pap, p.T @ r)
            x += p @ alpha
            r -= ap @ alpha
            relative = r.norm(dim=0) / scale
            bar.update()
            bar.set_postfix(residual=f"{relative.max().item():.1e}", directions=p.shape[1])
            if relative.max() <= tolerance:
                break
            z = precondition(r)
            beta = -torch.linalg.solve(pap, ap.T @ z)
            p = _orthonormal(z + p @ beta)
    residual = (rhs - matmat(x)).norm(dim=0) / scale
    return x, iterations, residual.where(rhs.norm(dim=0) > 0, torch.zeros_like(residual))


def nystrom(
    matmat: MatMat,
    size: int,
    rank: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """A randomized Nystrom approximation ``U diag(lam) U^T`` of a PSD operator from one product with a
    ``[size, rank]`` block: orthonormal ``U [size, rank]`` and ``lam [rank]`` (descending, >= 0).

    The numerically stable sketch of Tropp, Yurtsever, Udell and Cevher (SIMAX 2017), as used for
    preconditioning by Frangella, Tropp and Udell (SIMAX 2023): a small shift ``nu`` keeps the core
    matrix positive definite and is taken off the eigenvalues afterwards. The test block is drawn from
    a fixed seed, so every rank of a distributed run draws the same one.
    """
    generator = torch.Generator().manual_seed(seed)
    omega, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=dtype).to(device))
    product = matmat(omega)
    # The floor keeps an operator that is exactly zero (nothing to precondition) positive definite.
    nu = (size**0.5 * torch.finfo(dtype).eps * product.norm()).clamp(min=torch.finfo(dtype).tiny ** 0.5)
    for _ in range(4):  # rounding can leave the core indefinite at the smallest shift: shift more
        y = product + nu * omega
        core = omega.T @ y
        lower, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if not info:
            break
        nu *= 1e3
    else:
        raise torch.linalg.LinAlgError(
            "the Nystrom sketch's core matrix is not positive definite; is the operator PSD?"
        )
    u, singular, _ = torch.linalg.svd(torch.linalg.solve_triangular(lower, y.T, upper=False).T, full_matrices=False)
    return u, (singular**2 - nu).clamp(min=0.0)


def nystrom_preconditioner(u: Tensor, eigenvalues: Tensor, damping: float) -> MatMat:
    """``R -> M R`` with ``M = (lam_r + damping) U (diag(lam) + damping I)^-1 U^T + (I - U U^T)``, which
    approximates ``(A + damping I)^-1`` up to scale from ``nystrom``'s ``U, lam``: the top ``r``
    directions are inverted exactly and the rest scaled as the smallest of them, so the preconditioned
    system's condition number is about ``(lam_r + damping) / damping`` instead of ``(lam_1 + damping) / damping``."""
    scale = (eigenvalues[-1] + damping) / (eigenvalues + damping)

    def precondition(r: Tensor) -> Tensor:
        coefficients = u.T @ r
        return r + u @ ((scale[:, None] - 1) * coefficients)

    return precondition


def _orthonormal(block: Tensor) -> Tensor:
    """An orthonormal basis ``[P, r]`` of the columns of ``block``, dropping directions whose singular
    value is below ``sqrt(eps)`` of the largest (dependent or converged columns)."""
    u, s, _ = torch.linalg.svd(block, full_matrices=False)
    if not len(s):
        return u
    return u[:, s > s[0] * torch.finfo(block.dtype).eps ** 0.5]  # s is sorted, largest first


def lanczos_functions(
    matmat: MatMat,
    vectors: Tensor,
    functions: Sequence[Callable[[Tensor], Tensor]],
    tolerance: float = 1e-6,
    max_iterations: int = 300,
    progress: bool = False,
    desc: str = "Lanczos",
) -> tuple[list[Tensor], int]:
    """``f(A) v`` for each function ``f`` and each column ``v`` of ``vectors [P, K]``, by Lanczos.

    With the Lanczos basis ``V_m`` and tridiagonal ``T_m`` of ``A`` and ``v``, ``f(A) v`` is approximated
    by ``|v| V_m f(T_m) e_1``. The first pass runs the three-term recurrence until every coefficient
    vector ``|v| f(T_m) e_1`` has stopped changing (relative change since the last check below
    ``tolerance``; checked every step up to 20, then every 5); the second
    regenerates the basis from the stored recurrence coefficients and sums it, so memory stays
    ``O(P K)`` at the cost of twice the products. No reorthogonalisation: Lanczos for matrix
    functions stays accurate without it (Musco, Musco and Sidford, 2018).

    Args:
        matmat: ``V [P, K] -> A V``, ``A`` symmetric positive semi-definite.
        functions: Elementwise functions of non-negative eigenvalues (float64 tensors).

    Returns:
        ``[f(A) vectors for f in functions]`` (each ``[P, K]``), and the number of products taken.
    """
    norms = vectors.norm(dim=0)
    safe = norms.clamp(min=torch.finfo(vectors.dtype).tiny)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []  # betas[j] links basis vectors j and j + 1
    alive = norms > 0
    previous: list[Tensor] | None = None
    largest = torch.zeros_like(norms)  # the largest |alpha| so far: the scale of A seen by each column
    v_prev, v = torch.zeros_like(vectors), vectors / safe
    with tqdm(desc=desc, total=max_iterations, disable=not progress, leave=False) as bar:
        while len(alphas) < max_iterations:
            w = _next(matmat(v), v, v_prev, betas[-1] if betas else None, None)
            alpha = (v * w).sum(0)
            w = w - alpha * v
            beta = w.norm(dim=0)
            alphas.append(alpha.where(alive, torch.zeros_like(alpha)))
            largest = torch.maximum(largest, alpha.abs())
            # An exhausted Krylov space (beta ~ 0) is an exact answer: that column stops growing.
            alive &= beta > 10 * torch.finfo(vectors.dtype).eps * largest
            betas.append(beta.where(alive, torch.zeros_like(beta)))
            bar.update()
            if not bool(alive.any()):
                break
            # Convergence is judged every step while T_m is small, then every few steps: each check
            # eigendecomposes T_m, whose cost grows as m^3 (0.1 s for 16 columns at m = 300).
            if len(alphas) <= 4 * _CHECK_EVERY or len(alphas) % _CHECK_EVERY == 0:
                coefficients = _coefficients(alphas, betas, norms, functions)
                if previous is not None:
                    change = max(
                        ((c - F.pad(p, (0, c.shape[1] - p.shape[1]))).norm(dim=1) / c.norm(dim=1).clamp(min=1e-300))
                        .max()
                        .item()
                        for c, p in zip(coefficients, previous)
                    )
                    bar.set_postfix(change=f"{change:.1e}")
                    if change < tolerance:
                        break
                previous = coefficients
            v_prev, v = v, w / betas[-1].where(alive, torch.ones_like(beta))
    coefficients = _coefficients(alphas, betas, norms, functions)
    # Second pass: the same basis again, summed with the final coefficients.
    steps = len(alphas)
    results = [torch.zeros_like(vectors) for _ in functions]
    v_prev, v = torch.zeros_like(vectors), vectors / safe
    for j in range(steps):
        for result, c in zip(results, coefficients):
            result += c[:, j].to(vectors.dtype) * v
        if j + 1 < steps:
            # The first pass's operations in its order, so the basis is regenerated to the last bit.
            w = _next(matmat(v), v, v_prev, betas[j - 1] if j else None, alphas[j])
            v_prev, v = v, w / betas[j].where(betas[j] > 0, torch.ones_like(betas[j]))
    return results, 2 * steps - 1


def _next(av: Tensor, v: Tensor, v_prev: Tensor, beta: Tensor | None, alpha: Tensor | None) -> Tensor:
    w = av if beta is None else av - beta * v_prev
    return w if alpha is None else w - alpha * v


def _coefficients(
    alphas: list[Tensor], betas: list[Tensor], norms: Tensor, functions: Sequence[Callable[[Tensor], Tensor]]
) -> list[Tensor]:
    """``|v| f(T_m) e_1`` for each function, ``[K, m]`` each, from the recurrence so far (float64)."""
    m = len(alphas)
    a = torch.stack(alphas, 1).double()  # [K, m]
    b = torch.stack(betas[: m - 1], 1).double() if m > 1 else a[:, :0]
    t = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
    ritz, vectors = torch.linalg.eigh(t)
    ritz = ritz.clamp(min=0.0)  # A is PSD; rounding can give tiny negative Ritz values
    first = vectors[:, 0, :]  # e_1^T U: [K, m]
    return [norms.double()[:, None] * torch.einsum("kij,kj->ki", vectors, fn(ritz) * first) for fn in functions]
