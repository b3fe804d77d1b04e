r"""Segmented unrolling (SOURCE-like): the run as a few segments of locally quadratic training.

Within segment ``l`` (``K_l`` optimizer steps of mean effective step size ``eta_l``, curvature
``C_l`` and example gradient ``g_l`` averaged over the segment's snapshots), continuous-time SGD
on a quadratic carries the response ``r = dtheta/d(removal weight)`` through

.. math::
    r \mapsto S_l r + (I - S_l) C_l^{-1} \bar g_{l,n} / N, \qquad S_l = \exp(-\eta_l K_l C_l),

so the final response sums each segment's contribution propagated through the later segments.
Evaluated backwards from the measurement gradient ``a = grad m(theta_T)`` (with ``a <- S_l a``),
the effect of removing example ``n`` is ``sum_l (f_l(C_l) a_l)^T g_{l,n} / N`` with
``f_l(c) = (1 - exp(-eta_l K_l c)) / c``. One segment over a long run recovers the damped
influence function; ``c = 0`` directions get ``eta_l K_l``, the learning-rate time, as in early
training. ``C_l`` includes the weight decay; SGD momentum ``beta`` scales ``eta`` by ``1/(1 - beta)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dtda.curvature import SpectralCurvature
from lightning_dtda.trajectory import Trajectory


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
    optimizer = run.manifest["optimizer"]["class"]
    if not optimizer.endswith("SGD"):
        raise ValueError(
            f"method='segmented' models SGD, whose step is the learning rate; run {run.name} used {optimizer}. "
            "Use method='unrolled' for Adam."
        )


def segmented_effects(
    run: Trajectory,
    query_grads: Tensor,
    num_segments: int,
    load_model: Callable[[int], nn.Module],
    fit: Callable[[nn.Module], SpectralCurvature],
    contract: Callable[[nn.Module, Tensor], Tensor],
) -> Tensor:
    """Removal effects ``[Q, N]`` by segmented unrolling.

    Args:
        run: The recorded run.
        query_grads: ``[Q, P]`` measurement gradients at the final snapshot.
        num_segments: Number of segments.
        load_model: Snapshot index -> the module at that snapshot.
        fit: Module -> its curvature (EK-FAC or dense GGN) at the module's weights.
        contract: ``(module, vectors [Q, P]) -> vectors @ per-example training gradients^T``, ``[Q, N]``.
    """
    steps = run.snapshot_steps
    weight_decay = run.weight_decay
    num_train = run.dataset_length
    adjoint = query_grads
    effects = torch.zeros(len(query_grads), num_train, dtype=query_grads.dtype, device=query_grads.device)
    groups = segment_snapshots(run, num_segments)
    _check_sgd(run)
    for group in groups[::-1]:
        first, last = steps[group[0] - 1], steps[group[-1]]
        time = run.learning_rate_time(first, last)  # eta_l * K_l
        models = [load_model(index) for index in group]
        curvature = fit(models[-1])  # at the segment's last weights

        def contribution(e: Tensor, time: float = time) -> Tensor:
            c = e + weight_decay
            # (1 - exp(-T c)) / c, and its limit T as c -> 0
            return torch.where(c * time > 1e-8, -torch.expm1(-time * c) / c.clamp(min=1e-30), torch.full_like(c, time))

        weighted = curvature.apply(contribution, adjoint) / num_train
        for model in models:  # the example's gradient, averaged over the segment's snapshots
            effects += contract(model, weighted) / len(group)
        adjoint = curvature.apply(lambda e, time=time: torch.exp(-time * (e + weight_decay)), adjoint)
    return effects
