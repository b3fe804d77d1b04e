"""Curvature backends: fit at one set of weights, then solve ``(C + damping * I) x = v``.

``C`` approximates the Hessian of the mean training loss ``(1/N) sum_n l_n`` by its generalised
Gauss-Newton matrix (positive semi-definite), exactly (``ggn``) or Kronecker-factored
(``kfac``, ``ekfac``, through curvlinops), or not at all (``identity``: ``C = 0``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# The curvatures and GGN solvers, defined once: estimators' fields are typed with these (a LightningCLI
# file is checked against them when parsed) and the tuples validate values given in code.
CurvatureKind = Literal["ekfac", "kfac", "ggn", "identity"]
SpectralKind = Literal["ekfac", "ggn"]  # those with an eigenbasis or Krylov functions (see SpectralCurvature)
SolverKind = Literal["auto", "dense", "krylov"]
# An estimator's curvature setting: a kind, or "auto" (chosen per call; see Influence.resolve). One flat
# Literal, so that a LightningCLI error lists every value.
CurvatureSetting = Literal[("auto", *get_args(CurvatureKind))]  # type: ignore[valid-type]
SpectralSetting = Literal[("auto", *get_args(SpectralKind))]  # type: ignore[valid-type]
CURVATURES: tuple[str, ...] = get_args(CurvatureKind)
SPECTRAL: tuple[str, ...] = get_args(SpectralKind)
SOLVERS: tuple[str, ...] = get_args(SolverKind)

# solver="auto": below this many parameters the GGN is built and eigendecomposed (seconds on a CPU);
# above, Krylov methods use matrix products only.
DENSE_GGN_MAX_PARAMS = 4096
# solver="dense" is refused above this: the matrix alone would take 4 GB in float32.
DENSE_GGN_LIMIT = 32768


@contextlib.contextmanager
def forward_differentiable_kernels() -> Iterator[None]:
    """GGN products differentiate forwards (``jvp``): torch's fused transformer-layer fast path, which
    eval mode takes, has no forward-mode derivative, and among the attention kernels the math one is
    differentiable in every mode. Both are switched for the products."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class Curvature:
    """Base class: ``solve(vectors [K, P], damping)`` returns ``(C + damping * I)^-1 vectors``, ``[K, P]``.

    ``solver_report``: for the GGN with ``solver="auto"``, which solver was chosen and why (see ``choose_solver``).
    """

    solver_report: dict[str, Any] | None = None

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any] | None:
        """What ``fit_curvature`` needs to rebuild this curvature without the data (``None``: nothing
        worth keeping)."""
        return None


class IdentityCurvature(Curvature):
    """``C = 0``: the solve is ``vectors / damping``, so effects are scaled gradient dot products."""

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        return vectors / damping


class SpectralCurvature(Curvature):
    """A curvature with a known eigenbasis, so any function of it can be applied to vectors.

    ``apply(fn, vectors [K, P])`` returns ``Q fn(eigenvalues) Q^T vectors`` (``fn`` acts elementwise
    on the non-negative eigenvalues); the damped solve is ``fn = 1 / (eigenvalue + damping)``.
    """

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_functions(self, fns: Sequence[Callable[[Tensor], Tensor]], vectors: Tensor) -> list[Tensor]:
        """``[apply(fn, vectors) for fn in fns]``, which a Krylov backend computes in one pass."""
        return [self.apply(fn, vectors) for fn in fns]

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        return self.apply(lambda e: 1.0 / (e + damping), vectors)


def factor_eigh(factor: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a symmetric Kronecker factor, in float64.

    LAPACK's divide-and-conquer ``eigh`` can fail to converge even in float64 on a factor with many
    (numerically) repeated eigenvalues: it did on the 4,097-square input factor of the 1M-parameter
    CNN of benchmarks/speed.py (rank-deficient after ReLU and pooling), whose eigenvalues alone it
    computes. A diagonal jitter of 1e-14 times the largest diagonal entry splits the repeated
    eigenvalues, and the decomposition then holds for the factor itself to about that relative error.
    """
    matrix = factor.double()
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        scale = 1e-14 * matrix.diagonal().abs().max()
        jitter = torch.rand(len(matrix), generator=torch.Generator().manual_seed(0), dtype=matrix.dtype).to(
            matrix.device
        )
        return torch.linalg.eigh(matrix + torch.diag(scale * jitter))


def check_solver(kind: str, solver: str, subset: int | None) -> None:
    """Validate an estimator's ``solver`` and ``curvature_subset`` for curvature ``kind``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if solver != "auto" and kind != "ggn":
        raise ValueError(
            f"solver={solver!r} chooses how curvature='ggn' is solved; "
            + (
                "pass curvature='ggn' with it (curvature='auto' may choose another)."
                if kind == "auto"
                else f"curvature={kind!r} has one way. Leave solver='auto'."
            )
        )
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"curvature_subset must be None or a positive integer, got {subset!r}.")


def dense_ggn(solver: str, num_params: int) -> bool:
    """Whether ``solver`` builds the GGN of ``num_params`` parameters densely.

    Raises:
        ValueError: For an unknown solver, or ``"dense"`` above ``DENSE_GGN_LIMIT`` parameters.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if solver == "dense" and num_params > DENSE_GGN_LIMIT:
        raise ValueError(
            f"solver='dense' builds a {num_params} x {num_params} GGN; above {DENSE_GGN_LIMIT} parameters that is "
            "refused. Use solver='krylov'."
        )
    return solver == "dense" or (solver == "auto" and num_params <= DENSE_GGN_MAX_PARAMS)


def check_spectral(kind: str) -> None:
    """Refuse a backend without an eigenbasis or Krylov functions: ``fit_curvature`` gives a
    ``SpectralCurvature`` for ``"ekfac"`` and ``"ggn"``.

    Raises:
        ValueError: For another backend.
    """
    if kind not in SPECTRAL:
        raise ValueError(
            f"This estimator needs functions of the curvature: use curvature='ekfac' or 'ggn', not {kind!r}."
        )
