"""The exact generalised Gauss-Newton matrix: built densely and eigendecomposed, or through matrix products only."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from curvlinops import (
    GGNLinearOperator,
)
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_dtda.curvature._curvlinops import PyTorchLinearOperator, SummedOverRanks
from lightning_dtda.curvature.base import (
    DENSE_GGN_LIMIT,
    SpectralCurvature,
    factor_eigh,
    forward_differentiable_kernels,
)
from lightning_dtda.curvature.krylov import conjugate_gradients, lanczos_functions, nystrom, nystrom_preconditioner
from lightning_dtda.hooks import call_model
from lightning_dtda.sharding import all_reduce_sum

# Columns per GGN matrix product when building the dense matrix: bounds the memory of the vmap.
_DENSE_COLUMNS = 256

# A GGN product of K columns holds K tangents of every layer's outputs for its batch; batches are cut so
# that these stay within this many bytes. On the 1M-parameter CNN of benchmarks/speed.py (50 columns) the
# batches of 23 images this gives, instead of 128, lowered attribution's peak from 5.4 to 3.8 GB and made a
# product 9% faster (17.9 s against 19.6 s on 200 images, interleaved repeats).
GGN_TANGENT_BYTES = 2**29


def ggn_batch_size(model: nn.Module, inputs: Any, batch: int, columns: int, most: int) -> int:
    """Examples per batch for GGN products of ``columns`` columns: ``most``, or fewer where their tangents
    (``columns`` times the outputs of every leaf module, measured on ``inputs``, a batch of ``batch``
    examples) would pass ``GGN_TANGENT_BYTES``."""
    sizes: list[int] = []

    def measure(module: nn.Module, args: Any, output: Any) -> None:
        sizes.append(sum(t.numel() * t.element_size() for t in tree_leaves(output) if isinstance(t, Tensor)))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(measure) for m in leaves]
    try:
        with torch.no_grad(), forward_differentiable_kernels():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    per_example = max(1.0, sum(sizes) / batch)
    return max(1, min(most, int(GGN_TANGENT_BYTES // (columns * per_example))))


class DenseGGN(SpectralCurvature):
    """The exact GGN as a dense matrix, eigendecomposed once; any damping then costs one product."""

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor) -> None:
        self.eigenvalues, self.eigenvectors = eigenvalues, eigenvectors

    @classmethod
    def from_operator(cls, operator: GGNLinearOperator) -> "DenseGGN":
        num_params = operator.shape[0]
        eye = torch.eye(num_params, dtype=operator.dtype, device=operator.device)
        with forward_differentiable_kernels():
            ggn = torch.cat(
                [operator @ eye[:, i : i + _DENSE_COLUMNS] for i in range(0, num_params, _DENSE_COLUMNS)], dim=1
            )
        all_reduce_sum(ggn)  # each rank summed its shard of the data
        # In float64 whatever the model's precision: a float32 eigenbasis is orthogonal to about 1e-7,
        # which leaks the largest curvatures into the damped solve of the smallest (a user trial: 1e-2
        # relative error at damping 1e-5 on a float32 MLP, 1e-4 at 1e-3, where block CG was 1e-4 and 1e-5).
        eigenvalues, eigenvectors = factor_eigh((ggn + ggn.T) / 2)
        # A PSD matrix's rounding error can give tiny negative eigenvalues; they are zeros.
        return cls(eigenvalues.clamp(min=0.0), eigenvectors)

    def state(self) -> dict[str, Any]:
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        q = self.eigenvectors
        return (((vectors.to(q.dtype) @ q) * fn(self.eigenvalues)) @ q.T).to(vectors.dtype)


# Block CG is preconditioned by a Nystrom sketch whose rank is the block's width clamped to
# NYSTROM_RANKS, by default for blocks of at most NYSTROM_MAX_COLUMNS columns (see KrylovGGN).
NYSTROM_RANKS = (16, 64)


NYSTROM_MAX_COLUMNS = 8


class KrylovGGN(SpectralCurvature):
    """The exact GGN through matrix products only, for models of any size.

    ``solve`` runs block conjugate gradients on all vectors at once; ``apply_functions`` (segmented
    unrolling's ``exp(-T C)`` and ``(1 - exp(-T C)) / C``) runs Lanczos. Each iteration is one product
    of the GGN with a ``[P, K]`` block: one pass over the (sub)set of training data. ``reports``
    collects, for every solve, its products, final relative residual and seconds (CG) or its products and
    seconds (Lanczos).

    Preconditioning: a block of at most 8 columns (a few queries, or ``reduce="mean"``) is solved with
    a randomized Nystrom sketch of ``G`` as CG's preconditioner (``nystrom``;
    rank 16: one product of 16 columns, made once and reused by later solves). It inverts the top of the
    spectrum, which a narrow block's Krylov space takes many products to find: one query on the
    1M-parameter CNN of benchmarks/speed.py (GGN on 200 images, auto damping) took 90 products in 29 s
    plain and 49 + the sketch in 20 s. A wide block spans the top of the spectrum itself within a product
    or two: 50 queries there took 10 products (206 s) plain and 9 after a rank-50 sketch (215 s), so
    wider blocks are solved plain. Memory: the sketch's ``[P, rank]`` float64 basis. K-FAC and EK-FAC,
    the obvious preconditioners, made CG slower on every model measured (1.4-2x the products; they drop
    the cross-layer blocks; benchmarks/krylov.py).

    Args:
        operator: curvlinops' GGN of the mean training loss.
        tolerance: Relative residual at which CG stops, and relative change at which Lanczos stops.
        max_iterations: Products after which either stops; a solve that has not converged by then warns.
        preconditioned: ``None``: as above; ``True``/``False``: always/never, the sketch's rank then the
            first block's width clamped to 16-64.
    """

    def __init__(
        self,
        operator: PyTorchLinearOperator,
        tolerance: float = 1e-5,
        max_iterations: int = 500,
        progress: bool = False,
        preconditioned: bool | None = None,
    ) -> None:
        self.operator = SummedOverRanks(operator)
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.progress = progress
        self.preconditioned = preconditioned
        self._sketch: tuple[Tensor, Tensor] | None = None
        self.reports: list[dict[str, Any]] = []

    def matmat(self, columns: Tensor) -> Tensor:
        """The GGN times ``columns [P, K]``, summed over ranks, in ``columns``' dtype.

        The Krylov recurrences pass float64 whatever the model's precision: in float32, block CG loses
        conjugacy and needed 3-18x more products (measured on the digits MLP)."""
        with forward_differentiable_kernels():
            return (self.operator @ columns.to(self.operator.dtype)).to(columns.dtype)

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        report: dict[str, Any] = {}
        precondition = None
        if self.preconditioned or (self.preconditioned is None and len(vectors) <= NYSTROM_MAX_COLUMNS):
            if self._sketch is None:  # one product, about one CG iteration's cost, reused by later solves
                start = time.perf_counter()
                low, high = NYSTROM_RANKS
                self._sketch = nystrom(
                    self.matmat, self.operator.shape[0], min(max(len(vectors), low), high), device=vectors.device
                )
                report["nystrom_seconds"] = round(time.perf_counter() - start, 3)
            report["nystrom_rank"] = self._sketch[0].shape[1]
            precondition = nystrom_preconditioner(*self._sketch, damping)
        start = time.perf_counter()
        x, iterations, residual = conjugate_gradients(
            lambda v: self.matmat(v) + damping * v,
            vectors.T.double(),
            precondition,
            tolerance=self.tolerance,
            max_iterations=self.max_iterations,
            progress=self.progress,
            desc="GGN block conjugate gradients",
        )
        self.reports.append(
            {
                "cg_products": iterations,
                "cg_residual": residual.max().item(),
                "cg_seconds": round(time.perf_counter() - start, 3),
                **report,
            }
        )
        x = x.to(vectors.dtype)
        if residual.max() > 10 * self.tolerance:
            rank_zero_warn(
                f"GGN block conjugate gradients stopped after {iterations} products at relative residual "
                f"{residual.max():.1e} (tolerance {self.tolerance:.0e}); the effects are that inaccurate. Raise the "
                "damping (a small one leaves the system ill-conditioned), or use solver='dense' (up to 32,768 parameters)."
            )
        return x.T

    def apply_functions(self, fns: Sequence[Callable[[Tensor], Tensor]], vectors: Tensor) -> list[Tensor]:
        start = time.perf_counter()
        results, products = lanczos_functions(
            self.matmat, vectors.T.double(), fns, self.tolerance, self.max_iterations, self.progress, "GGN Lanczos"
        )
        self.reports.append({"lanczos_products": products, "lanczos_seconds": round(time.perf_counter() - start, 3)})
        if products >= 2 * self.max_iterations - 1:
            rank_zero_warn(
                f"GGN Lanczos stopped after {self.max_iterations} iterations before converging; raise max_iterations."
            )
        return [r.T.to(vectors.dtype) for r in results]

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        return self.apply_functions([fn], vectors)[0]


# solver="auto": the products a Krylov solve is expected to take, from the largest counts measured
# (KrylovGGN's docstring, benchmarks/krylov.py): about 50 for a narrow block after the Nystrom sketch, 10-20
# for a wide one. Erring high, the dense solve is chosen only where it clearly costs less.
AUTO_PRODUCTS_NARROW, AUTO_PRODUCTS_WIDE = 60, 25


def choose_solver(operator: PyTorchLinearOperator, num_columns: int) -> tuple[str, dict[str, Any]]:
    """``"dense"`` or ``"krylov"`` for solving ``num_columns`` vectors with ``operator``'s GGN, by predicted
    time, and the prediction (for the run's settings).

    One timed product with a block of the solve's width (at least 16, at most 256 columns), after an untimed
    one-column product that warms up, gives the seconds per column ``c``. Dense: ``P`` columns of products plus the eigendecomposition (a timed
    256-square ``eigh`` scaled by ``(P / 256)^3``). Krylov: the expected products (``AUTO_PRODUCTS_*``) of
    ``num_columns`` columns, plus the Nystrom sketch for a narrow block. The probe costs about one Krylov
    product and a one-column one. Above ``DENSE_GGN_LIMIT`` parameters the answer is ``"krylov"`` without a probe.
    """
    num_params = operator.shape[0]
    if num_params > DENSE_GGN_LIMIT:
        return "krylov", {"solver": "krylov", "solver_reason": f"{num_params} parameters, above the dense limit"}
    width = min(num_params, max(num_columns, 16), _DENSE_COLUMNS)
    probe = torch.randn(num_params, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(device=operator.device, dtype=operator.dtype)
    with forward_differentiable_kernels():
        operator @ probe[:, :1]  # untimed: the first product pays for warming up (kernels, allocations)
        start = time.perf_counter()
        operator @ probe
    per_column = (time.perf_counter() - start) / width
    narrow = num_columns <= NYSTROM_MAX_COLUMNS
    products = AUTO_PRODUCTS_NARROW if narrow else AUTO_PRODUCTS_WIDE
    predicted = torch.tensor(
        [
            num_params * per_column + _eigh_seconds(num_params),
            (products * num_columns + (NYSTROM_RANKS[0] if narrow else 0)) * per_column,
        ],
        dtype=torch.float64,
        device=operator.device,
    )
    all_reduce_sum(predicted)  # every rank must take the same branch: the products are collective
    dense, krylov = predicted.tolist()
    solver = "dense" if dense < krylov else "krylov"
    return solver, {
        "solver": solver,
        "solver_reason": f"predicted {dense:.3g} s dense against {krylov:.3g} s by Krylov methods",
    }


def _eigh_seconds(num_params: int) -> float:
    """Predicted seconds of a float64 ``eigh`` of a ``num_params``-square matrix on this machine."""
    global _EIGH_256
    if _EIGH_256 is None:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        a = a @ a.T
        torch.linalg.eigh(a)  # the first call loads LAPACK
        start = time.perf_counter()
        torch.linalg.eigh(a)
        _EIGH_256 = time.perf_counter() - start
    return _EIGH_256 * (num_params / 256) ** 3


_EIGH_256: float | None = None
