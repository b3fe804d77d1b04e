"""Every use of curvlinops 3.0's private attributes, in one file, so an upgrade touches only this one.

The package pins the 3.0 series (3.1 renames the operator API). What is used beyond the public API:
the base class's shapes and ``_matmat`` (to sum a sharded operator over ranks), the K-FAC inverse's
eigendecomposition hook and damping (float64 ``eigh``; one inverse for many dampings), the Kronecker
factors and EK-FAC's corrected eigenvalues (summed over ranks; replaced by a function of them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.kfac_utils import loss_hessian_matrix_sqrt
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_dtda.sharding import all_reduce_sum

__all__ = [
    "KFACInverse",
    "PyTorchLinearOperator",
    "SummedOverRanks",
    "eigendecompose_factors",
    "loss_hessian_matrix_sqrt",
    "sum_corrected_eigenvalues",
    "sum_factors",
    "with_eigenvalue_function",
]


class SummedOverRanks(PyTorchLinearOperator):
    """A curvature operator on this rank's shard of the data, summed over ranks at every product."""

    def __init__(self, operator: PyTorchLinearOperator) -> None:
        super().__init__(operator._in_shape, operator._out_shape)
        self.operator = operator

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        return [all_reduce_sum(t) for t in self.operator._matmat(M)]

    def _adjoint(self) -> SummedOverRanks:
        return self

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype


class KFACInverse(KFACInverseLinearOperator):
    """curvlinops' damped K-FAC inverse with the factors eigendecomposed by ``eigh`` (float64: float32
    ``eigh`` fails to converge on the rank-deficient factors of ReLU/pooling CNNs, measured on the
    1M-parameter CNN of benchmarks/speed.py), and a damping that can be changed after construction
    (the eigendecompositions it caches do not depend on it)."""

    def __init__(
        self, operator: KFACLinearOperator, eigh: Callable[[Tensor], tuple[Tensor, Tensor]], damping: float
    ) -> None:
        self._eigh = eigh
        super().__init__(operator, damping=damping, use_exact_damping=True)

    def set_damping(self, damping: float) -> None:
        self._damping = damping

    def _compute_factors_eigendecomposition(self, aaT: Tensor | None, ggT: Tensor | None) -> tuple[Any, Any]:
        def eigh(factor: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if factor is None:
                return None, None
            values, vectors = self._eigh(factor)
            return values.to(factor.dtype), vectors.to(factor.dtype)

        return eigh(aaT), eigh(ggT)


def sum_factors(operator: KFACLinearOperator) -> None:
    """Sum the Kronecker factors over ranks, in place (each rank collected them on its shard)."""
    for factors in (operator._input_covariances, operator._gradient_covariances):
        tree_map(all_reduce_sum, factors)


def eigendecompose_factors(operator: EKFACLinearOperator, eigh: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
    """What curvlinops' EK-FAC does before its eigenvalue correction, with ``eigh`` (float64, see
    ``KFACInverse``) in place of its own float32 one: each factor is replaced by its eigenvectors."""
    for name in operator._mapping:
        for source, destination in (
            (operator._input_covariances, operator._input_covariances_eigenvectors),
            (operator._gradient_covariances, operator._gradient_covariances_eigenvectors),
        ):
            factor = source.pop(name, None)
            if factor is not None:
                destination[name] = eigh(factor)[1].to(factor.dtype)


def sum_corrected_eigenvalues(operator: EKFACLinearOperator) -> None:
    """Sum EK-FAC's corrected eigenvalues over ranks, in place (a sum over the data in the summed factors' basis)."""
    tree_map(all_reduce_sum, operator._corrected_eigenvalues)


@contextlib.contextmanager
def with_eigenvalue_function(operator: EKFACLinearOperator, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside, ``operator`` multiplies by ``fn(EK-FAC)``: curvlinops 3.0 multiplies by ``Q diag(corrected
    eigenvalues) Q^T``, so ``fn`` of the (non-negative) eigenvalues stands in for them."""
    operator._maybe_compute_ekfac()
    original = operator._corrected_eigenvalues
    operator._corrected_eigenvalues = tree_map(lambda e: fn(e.clamp(min=0.0)), original)
    try:
        yield
    finally:
        operator._corrected_eigenvalues = original
