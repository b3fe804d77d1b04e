r"""Segmented unrolling (SOURCE-like): the run as a few segments of locally quadratic training.

Within segment ``l`` (``K_l`` optimizer steps of mean effective step size ``eta_l``, curvature
``C_l`` and example gradient ``g_l`` averaged over the segment's snapshots), continuous-time SGD
on a quadratic carries the response ``r = dtheta/d(removal weight)`` through

    r \mapsto S_l r + (I - S_l) C_l^{-1} \bar g_{l,n} / N, \qquad S_l = \exp(-\eta_l K_l C_l),

so the final response sums each segment's contribution propagated through the later segments.
Evaluated backwards from the measurement gradient ``a = grad m(theta_T)`` (with ``a <- S_l a``),
the effect of removing example ``n`` is ``sum_l (f_l(C_l) a_l)^T g_{l,n} / N`` with
``f_l(c) = (1 - exp(-eta_l K_l c)) / c``. One segment over a long run recovers the damped
influence function; ``c = 0`` directions get ``eta_l K_l``, the learning-rate time, as in early
training. ``C_l`` includes the weight decay; SGD momentum ``beta`` scales ``eta`` by ``1/(1 - beta)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dtda.curvature.base import SolverKind, SpectralCurvature, SpectralKind, check_solver, check_spectral
from lightning_dtda.curvature.ggn import KrylovGGN
from lightning_dtda.curvature.tracked import check_modules, tracked_parameters
from lightning_dtda.damping import learning_rate_time
from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.estimators.base import Estimator, RunContext
from lightning_dtda.runs.trajectory import Trajectory


def segment_snapshots(run: Trajectory, num_segments: int) -> list[list[int]]:
    """Split the snapshots after step 0 into ``num_segments`` consecutive groups (snapshot indices)."""
    indices = list(range(1, len(run.snapshot_steps)))
    if not 1 <= num_segments <= len(indices):
        raise ValueError(
            f"segments={num_segments}, but run {run.name} has {len(indices)} snapshots after step 0. Use at most "
            "that many segments, or record more snapshots (every_n_epochs=1 or every_n_train_steps)."
        )
    return [chunk.tolist() for chunk in np.array_split(np.array(indices), num_segments)]


def _check_sgd(run: Trajectory) -> None:
    if run.manifest.optimizer != "SGD":
        raise UnsupportedTrainingError(
            f"Segmented models SGD, whose step is the learning rate; run {run.name} used {run.manifest.optimizer_class}. "
            "Use Unrolled() for Adam or AdamW."
        )


@dataclass(frozen=True)
class Segmented(Estimator):
    """Segmented unrolling (see the module docstring): the run as ``segments`` segments of locally
    quadratic SGD, each with the curvature at its last snapshot. One segment over a long run is the
    damped influence function; more segments follow the run's path more closely.

    Args:
        segments: Number of segments; at most the number of snapshots after step 0.
        curvature: ``"ekfac"`` (default) or ``"ggn"`` (exact): functions of the curvature are needed,
            which EK-FAC's eigenbasis and the GGN's eigendecomposition or Lanczos give.
        solver: How ``"ggn"``'s functions are computed: ``"dense"`` (eigendecomposition, up to 32,768
            parameters), ``"krylov"`` (Lanczos on GGN products, any size; products per run in the
            settings) or ``"auto"`` (dense up to 4,096 parameters).
        curvature_subset: Fit each segment's curvature on this many training examples drawn at random.
        modules: Names of submodules to attribute through (``None``: the whole model); ``"ekfac"`` tracks
            only the layers among them that K-FAC factors, as ``Influence`` does.

    Raises:
        ValueError: For fewer than one segment, a curvature without functions or an unknown solver; at
            attribution, for a run with fewer snapshots than segments or an optimizer other than SGD.

    Example:

        ```python
        Attributor(MyModule, "runs/", train_set, estimator=Segmented(segments=4, curvature="ekfac"))
        ```
    """

    segments: int = 4
    curvature: SpectralKind = "ekfac"
    solver: SolverKind = "auto"
    curvature_subset: int | None = None
    modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"segments must be a positive integer, got {self.segments!r}.")
        check_spectral(self.curvature)
        check_solver(self.curvature, self.solver, self.curvature_subset)
        object.__setattr__(self, "modules", check_modules(self.modules))

    def tracked_parameters(self, model: nn.Module, batch: Any) -> list[str]:
        return tracked_parameters(model, self.curvature, self.modules, batch)

    def estimate(self, context: RunContext) -> tuple[Tensor, dict[str, Any]]:
        return segmented_effects(context, self.segments, self.curvature, self.solver, self.curvature_subset)


def segmented_effects(
    context: RunContext,
    num_segments: int,
    kind: str,
    solver: str = "auto",
    subset: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Removal effects ``[Q, N]`` by segmented unrolling of ``context.run`` with curvature ``kind``, and
    what to report: the GGN products Lanczos took over all segments and the solver ``"auto"`` chose."""
    run, query_grads = context.run, context.query_grads
    products, report = 0, {}

    steps = run.snapshot_steps
    weight_decay = run.weight_decay
    num_train = run.dataset_length
    adjoint = query_grads
    effects = torch.zeros(len(query_grads), num_train, dtype=query_grads.dtype, device=query_grads.device)
    _check_sgd(run)  # first: more snapshots would not help an Adam run
    groups = segment_snapshots(run, num_segments)
    for group in groups[::-1]:
        first, last = steps[group[0] - 1], steps[group[-1]]
        time = learning_rate_time(run, first, last)  # eta_l * K_l
        models = [context.load_model(index) for index in group]
        curvature = context.fit_curvature(
            kind, models[-1], solver=solver, subset=subset
        )  # at the segment's last weights
        assert isinstance(curvature, SpectralCurvature)

        def contribution(e: Tensor, time: float = time) -> Tensor:
            c = e + weight_decay
            # (1 - exp(-T c)) / c, and its limit T as c -> 0
            return torch.where(c * time > 1e-8, -torch.expm1(-time * c) / c.clamp(min=1e-30), torch.full_like(c, time))

        def decay(e: Tensor, time: float = time) -> Tensor:
            return torch.exp(-time * (e + weight_decay))

        weighted, adjoint = curvature.apply_functions([contribution, decay], adjoint)
        report.update(curvature.solver_report or {})
        if isinstance(curvature, KrylovGGN):
            products += curvature.reports[-1]["lanczos_products"]
        for model in models:  # the example's gradient, averaged over the segment's snapshots
            effects += context.contract(model, weighted / num_train) / len(group)
    return effects, {**report, "lanczos_products": products} if products else report
