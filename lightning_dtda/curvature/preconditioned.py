"""The exact GGN seen through a fixed diagonal preconditioner: Adam's geometry for segmented unrolling.

Adam moves the weights by ``lr * D (g + l2 * theta) + lr * decoupled * theta`` per step, with ``D`` the
diagonal ``1 / (sqrt(v_hat) + eps)``. Held fixed over a segment, the response ``r`` of the weights to an
example's weight follows ``dr/dt = -(D (G + l2 I) + decoupled I) r - D g``; in the coordinates
``s = D^{-1/2} r`` that matrix is the symmetric ``A = D^{1/2} (G + l2 I) D^{1/2} + decoupled I``, whose
functions this class applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_dtda.curvature.base import SpectralCurvature, factor_eigh
from lightning_dtda.curvature.ggn import DenseGGN, KrylovGGN
from lightning_dtda.curvature.krylov import lanczos_functions


class PreconditionedGGN(SpectralCurvature):
    """``A = S (G + l2 I) S + decoupled I`` for the exact GGN ``G`` and ``S = diag(scale)``.

    Args:
        ggn: The exact GGN, dense (``A`` is then built and eigendecomposed) or by products (Lanczos).
        scale: ``[P]``, the square root of the diagonal preconditioner (positive).
        l2: Weight decay added to the gradient, preconditioned with it (``torch.optim.Adam``'s).
        decoupled: Weight decay applied to the weights directly (``torch.optim.AdamW``'s, times nothing else).
    """

    def __init__(self, ggn: DenseGGN | KrylovGGN, scale: Tensor, l2: float = 0.0, decoupled: float = 0.0) -> None:
        self.ggn, self.scale, self.l2, self.decoupled = ggn, scale.double(), l2, decoupled
        self.reports = ggn.reports if isinstance(ggn, KrylovGGN) else []
        self._dense: tuple[Tensor, Tensor] | None = None

    def matmat(self, columns: Tensor) -> Tensor:
        """``A`` times ``columns [P, K]`` (float64)."""
        s = self.scale.to(columns.device)[:, None]
        scaled = s * columns
        if isinstance(self.ggn, KrylovGGN):
            product = self.ggn.matmat(scaled)
        else:
            q, e = self.ggn.eigenvectors, self.ggn.eigenvalues
            product = q @ (e[:, None] * (q.T @ scaled))
        return s * (product + self.l2 * scaled) + self.decoupled * columns

    def apply_functions(self, fns: Sequence[Callable[[Tensor], Tensor]], vectors: Tensor) -> list[Tensor]:
        if isinstance(self.ggn, KrylovGGN):
            results, products = lanczos_functions(
                self.matmat, vectors.T.double(), fns, self.ggn.tolerance, self.ggn.max_iterations, self.ggn.progress
            )
            self.reports.append({"lanczos_products": products})
            return [r.T.to(vectors.dtype) for r in results]
        if self._dense is None:  # A built from the GGN's eigendecomposition, then its own
            eye = torch.eye(len(self.scale), dtype=torch.float64, device=self.ggn.eigenvectors.device)
            a = self.matmat(eye)
            eigenvalues, eigenvectors = factor_eigh((a + a.T) / 2)
            self._dense = eigenvalues.clamp(min=0.0), eigenvectors
        e, q = self._dense
        v = vectors.to(q.dtype)
        return [(((v @ q) * fn(e)) @ q.T).to(vectors.dtype) for fn in fns]

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        return self.apply_functions([fn], vectors)[0]
