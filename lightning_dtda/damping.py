"""Damping: every rule that chooses it, in one place.

- ``"auto"`` for the exact GGN (``auto_damping``): ``1 / T + weight_decay``, ``T`` the run's
  learning-rate time (``learning_rate_time``), which under Adam needs the step scale the recorder
  notes at every snapshot (``adam_step_scale``).
- ``"auto"`` for K-FAC and EK-FAC (``fit_damping``): fitted per run on a grid around the GGN's rule.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.runs.trajectory import Trajectory


class Solver(Protocol):
    """A curvature's damped solve (``Curvature``)."""

    def solve(self, vectors: Tensor, damping: float) -> Tensor: ...


class Products(Protocol):
    """The exact GGN's products (``KrylovGGN``)."""

    def matmat(self, columns: Tensor) -> Tensor: ...


def auto_damping(run: Trajectory) -> float:
    """The ``"auto"`` damping of the exact GGN for ``run``: ``1 / learning_rate_time(run) + weight_decay``
    (AdamW's decoupled decay divided by Adam's step scale), and the start of K-FAC's fitted damping.

    Raises:
        ValueError: If the run has taken no step with a positive learning rate, or trained with an
            optimizer whose learning-rate time is not modelled (see ``learning_rate_time``).
    """
    time = learning_rate_time(run)
    if not time > 0:
        raise ValueError(
            f"damping='auto' is 1 / the run's learning-rate time, but {run.name} has taken no step with a positive "
            "learning rate yet; give a damping."
        )
    weight_decay = run.weight_decay
    if run.manifest.optimizer == "AdamW":
        # Decoupled decay shrinks the weights by lr * wd per step, outside Adam's scaling: in the
        # scaled time above it is a curvature of wd / step_scale.
        weight_decay /= run.snapshots[-1].step_scale or 1.0
    return 1.0 / time + weight_decay


def learning_rate_time(run: Trajectory, first: int = 0, last: int | None = None) -> float:
    r"""Total effective step size ``\sum_t \eta_t s_t`` of steps ``first+1 .. last`` (default:
    the whole run), first parameter group.

    ``s_t`` is how far one unit of gradient moves the weights per unit of learning rate. SGD with
    momentum ``beta``: ``1 / (1 - beta)`` (the step's own ``beta`` where a schedule changed it).
    Adam, AdamW: the median of ``1 / (sqrt(v_hat) + eps)`` over the parameters' entries, recorded at
    each snapshot (``SnapshotEntry.step_scale``) and used for the steps up to it (Adam's ``beta1``
    averages gradients rather than summing them, so it adds no factor).

    Steps that 16-mixed's gradient scaler skipped moved nothing and count for nothing.

    Raises:
        ValueError: For another optimizer, whose step per unit of gradient this does not model, and
            for an Adam run recorded without step scales (before 0.3).
    """
    optimizer = run.manifest.optimizer
    if optimizer in ("Adam", "AdamW"):
        scaled = zip(run.steps, _adam_scales(run))
        return sum(step.lrs[0] * scale for step, scale in list(scaled)[first:last] if not step.skipped)
    if optimizer != "SGD":
        raise UnsupportedTrainingError(
            f"The learning-rate time models SGD, Adam and AdamW, whose step per unit of gradient is known; run {run.name} "
            f"trained with {run.manifest.optimizer_name}: give a damping."
        )
    momentum = float(run.optimizer_groups[0].get("momentum") or 0.0)
    # A momentum schedule (recorded per step since 0.2) gives each step its own factor.
    return sum(
        step.lrs[0] / (1.0 - step.scheduled.get("momentum", (momentum,))[0])
        for step in run.steps[first:last]
        if not step.skipped
    )


def _adam_scales(run: Trajectory) -> list[float]:
    """Each step's Adam step scale: that of the snapshot closing its interval."""
    scales = []
    for previous, entry in zip(run.snapshots, run.snapshots[1:]):
        skipped = all(step.skipped for step in run.steps[previous.step : entry.step])
        if entry.step_scale is None and not skipped:  # all skipped: Adam had no state yet, and none is needed
            raise ValueError(
                f"Run {run.name} trained with {run.manifest.optimizer_name}, whose step per unit of "
                "gradient the recorder noted only from version 0.3 on, and this run lacks it: record it again, or "
                "give a damping."
            )
        scales += [entry.step_scale or 0.0] * (entry.step - previous.step)
    return scales


_SCALE_SAMPLE = 1 << 20


def adam_step_scale(optimizer: torch.optim.Optimizer) -> float | None:
    """The median over the entries that have had a gradient of Adam's per-entry step multiplier
    ``1 / (sqrt(v_hat) + eps)`` (``v_hat`` the bias-corrected second moment), or ``None`` for an
    optimizer without second moments or before its first step. The ``"auto"`` damping rule needs it: under Adam an entry moves
    ``lr / (sqrt(v_hat) + eps)`` per unit of gradient, not ``lr``."""
    moments = []  # (second moment, its bias correction, eps) per parameter
    for group in optimizer.param_groups:
        beta2 = group.get("betas", (None, None))[1]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            # With amsgrad, Adam divides by the running maximum of the second moment.
            v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
            if beta2 is not None and v is not None:
                moments.append((v, 1 - beta2 ** float(state["step"]), group["eps"]))
    if not moments:
        return None
    stride = max(1, sum(v.numel() for v, _, _ in moments) // _SCALE_SAMPLE)
    sampled = [(v.detach().flatten()[::stride].float(), correction, eps) for v, correction, eps in moments]
    # Entries that never had a gradient (unused embedding rows, always-zero inputs) never moved: their
    # 1 / eps would decide the median when they are most of the model.
    scales = [1.0 / ((v[v > 0] / correction).sqrt() + eps) for v, correction, eps in sampled]
    flat = torch.cat(scales)
    return float(flat.median().cpu()) if len(flat) else None


# Candidate dampings of fit_damping, as multiples of the exact GGN's damping (half decades).
DAMPING_GRID = tuple(10 ** (k / 2) for k in range(-4, 9))


def fit_damping(approximate: Solver, ggn: Products, vectors: Tensor, damping: float) -> tuple[float, list[float]]:
    """The damping under which ``approximate``'s damped solves point most nearly the way of the exact ones.

    With the exact damped GGN ``A = G + damping I``, each vector ``g`` (a query gradient) and its
    approximate solve ``x(lam) = (K + lam I)^-1 g``, the criterion is

        E(lam) = - sum_g (g^T x)^2 / (2 x^T A x) = - sum_g |x*|_A^2 cos_A(x, x*)^2 / 2,

    ``x* = A^-1 g`` (since ``g^T x = x*^T A x``): the energy error of ``x`` at its best scale, so it
    needs one GGN product and no exact solve. Scale is left out because rankings do not depend on it,
    and with it in, the criterion prefers large dampings that shrink every wrong direction (measured:
    on the digits benchmark that chose 10x the GGN damping and scored 0.16 Spearman against 0.39).

    Args:
        approximate: K-FAC or EK-FAC.
        ggn: The exact GGN at the same weights, for its products.
        vectors: ``[K, P]`` probe vectors.
        damping: The exact GGN's damping (the ``"auto"`` rule).

    Returns:
        The candidate ``damping * DAMPING_GRID`` with the smallest ``E``, and every candidate's ``E``.
    """
    candidates = [damping * factor for factor in DAMPING_GRID]
    g = vectors.double()
    totals = []
    for lam in candidates:  # one product per candidate bounds the memory of the GGN's vmap
        x = approximate.solve(vectors, lam).double()
        ax = ggn.matmat(x.T).T + damping * x
        totals.append((-0.5 * (g * x).sum(1) ** 2 / (x * ax).sum(1)).sum().item())
    return candidates[min(range(len(candidates)), key=totals.__getitem__)], totals


def grid_edge(totals: list[float]) -> str | None:
    """``"smallest"`` or ``"largest"`` where the criterion ``totals`` of ``fit_damping`` is least at the first
    or last candidate of its grid, whose best lies then beyond the range searched; ``None`` inside it."""
    best = min(range(len(totals)), key=totals.__getitem__)
    return "smallest" if best == 0 else "largest" if best == len(totals) - 1 else None
