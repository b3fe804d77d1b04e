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

Under Adam and AdamW the segment's step is ``eta D (g + l2 theta) + eta decoupled theta`` with Adam's
``D = 1 / (sqrt(v_hat) + eps)`` held at its value at the segment's last snapshot (from a replay of the
run): the same formulas hold for ``A = D^{1/2} (G + l2 I) D^{1/2} + decoupled I`` in the coordinates
``D^{-1/2} r``, the adjoint and the example gradients carried through ``D^{1/2}`` (``PreconditionedGGN``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dtda.curvature.base import SolverKind, SpectralCurvature, SpectralSetting, check_solver, check_spectral
from lightning_dtda.curvature.ggn import KrylovGGN
from lightning_dtda.curvature.preconditioned import PreconditionedGGN
from lightning_dtda.curvature.tracked import check_modules, tracked_parameters
from lightning_dtda.damping import learning_rate_time
from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.estimators.base import Estimator, RunContext
from lightning_dtda.replay.check import replay_checked
from lightning_dtda.replay.engine import Replay
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


def _check_optimizer(run: Trajectory, kind: str) -> None:
    optimizer = run.manifest.optimizer
    if optimizer not in ("SGD", "Adam", "AdamW"):
        raise UnsupportedTrainingError(
            f"Segmented models SGD, Adam and AdamW, whose steps it knows; run {run.name} used "
            f"{run.manifest.optimizer_class}. Use Influence()."
        )
    if optimizer != "SGD":
        # One preconditioner model for all parameters: groups that differ in rate, decay or betas are not it.
        keys = ("lr", "weight_decay", "betas", "eps", "decoupled_weight_decay")
        groups = {tuple(str(g.get(k)) for k in keys) for g in run.optimizer_groups}
        if len(groups) > 1:
            raise UnsupportedTrainingError(
                f"Segmented models one {optimizer} setting for all parameters; run {run.name}'s parameter groups "
                "differ in learning rate, weight decay, betas or eps. Use Unrolled() or Influence()."
            )
    if optimizer != "SGD" and kind != "ggn":
        raise UnsupportedTrainingError(
            f"Segmented on an {optimizer} run preconditions the curvature by Adam's per-entry step sizes, which "
            f"breaks {kind.upper()}'s Kronecker structure: use Segmented(curvature='ggn')."
        )


def adam_preconditioners(context: RunContext, snapshots: list[int]) -> dict[int, Tensor]:
    """Adam's preconditioner at each of ``snapshots`` (indices), as ``S = D^{1/2}`` with
    ``D = 1 / (sqrt(v_hat) + eps)``: ``[P]`` over the tracked parameters. ``v`` comes from a replay of the
    run (checked against its snapshots, as unrolling's is), so no optimizer state need have been recorded."""
    run = context.run
    replay = Replay(context.load_model(0), run, context.train_data)
    ones = torch.ones(1, run.dataset_length)
    params, state, checkpoints = replay_checked(replay, ones, context.progress, keep_checkpoints=True)
    states = [saved for _, saved in checkpoints] + [state]  # the state at each snapshot, in order
    group = run.optimizer_groups[0]
    beta2, eps = float(group["betas"][1]), float(group["eps"])
    names = context.params or replay.names
    scales = {}
    for index in snapshots:
        at, t = states[index], states[index]["step"]
        v_hat = [at["exp_avg_sq"][replay.names.index(name)][0] / (1 - beta2**t) for name in names]
        scales[index] = torch.cat([(1.0 / (v.sqrt() + eps)).sqrt().flatten() for v in v_hat]).double()
    return scales


@dataclass(frozen=True)
class Segmented(Estimator):
    """Segmented unrolling (see the module docstring): the run as ``segments`` segments of locally
    quadratic SGD (or Adam with its preconditioner held fixed per segment), each with the curvature at its
    last snapshot. One segment over a long run is the damped influence function; more segments follow
    the run's path more closely.

    Args:
        segments: Number of segments; at most the number of snapshots after step 0.
        curvature: ``"auto"`` (default: ``"ggn"`` for Adam and AdamW runs, which need it, ``"ekfac"`` for
            SGD runs; logged and in the settings' ``curvature_reason``), ``"ekfac"`` or ``"ggn"`` (exact):
            functions of the curvature are needed, which EK-FAC's eigenbasis and the GGN's
            eigendecomposition or Lanczos give.
        solver: How ``"ggn"``'s functions are computed: ``"dense"`` (eigendecomposition, up to 32,768
            parameters), ``"krylov"`` (Lanczos on GGN products, any size; products per run in the
            settings) or ``"auto"`` (the one predicted faster, as for ``Influence``).
        curvature_subset: Fit each segment's curvature on this many training examples drawn at random.
        modules: Names of submodules to attribute through (``None``: the whole model); ``"ekfac"`` tracks
            only the layers among them that K-FAC factors, as ``Influence`` does.

    Raises:
        ValueError: For fewer than one segment, a curvature without functions or an unknown solver; at
            attribution, for a run with fewer snapshots than segments, an optimizer other than SGD, Adam and
            AdamW, or an Adam run with ``"ekfac"``.

    Example:

        ```python
        Attributor(MyModule, "runs/", train_set, estimator=Segmented(segments=4, curvature="ekfac"))
        ```
    """

    segments: int = 4
    curvature: SpectralSetting = "auto"
    solver: SolverKind = "auto"
    curvature_subset: int | None = None
    modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"segments must be a positive integer, got {self.segments!r}.")
        if self.curvature != "auto":
            check_spectral(self.curvature)
        check_solver("ggn" if self.curvature == "auto" else self.curvature, self.solver, self.curvature_subset)
        object.__setattr__(self, "modules", check_modules(self.modules))

    def resolve(
        self, runs: Sequence[Trajectory], num_params: Callable[[], int], num_columns: int | None
    ) -> tuple["Segmented", str | None]:
        """For ``curvature="auto"``: ``"ggn"`` if a run trained with Adam or AdamW (whose preconditioner breaks
        EK-FAC's structure), ``"ekfac"`` for SGD runs; and why."""
        if self.curvature != "auto":
            return self, None
        adam = sorted({run.manifest.optimizer_name for run in runs if run.manifest.optimizer in ("Adam", "AdamW")})
        if adam:
            return replace(self, curvature="ggn"), f"runs trained with {', '.join(adam)}: the exact GGN, preconditioned"
        return replace(self, curvature="ekfac"), "SGD runs: EK-FAC, the cheaper curvature with functions"

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
    num_train = run.dataset_length
    adjoint = query_grads
    effects = torch.zeros(len(query_grads), num_train, dtype=query_grads.dtype, device=query_grads.device)
    adam = run.manifest.optimizer in ("Adam", "AdamW")
    _check_optimizer(run, kind)  # first: more snapshots would not help a run it cannot model
    groups = segment_snapshots(run, num_segments)
    scales = adam_preconditioners(context, [group[-1] for group in groups]) if adam else {}
    # SGD: the weight decay is curvature, added to the eigenvalues; Adam's sits inside PreconditionedGGN.
    weight_decay = 0.0 if adam else run.weight_decay
    for group in groups[::-1]:
        first, last = steps[group[0] - 1], steps[group[-1]]
        # eta_l * K_l; under Adam the raw learning rates, the preconditioner scaling each entry
        time = (
            sum(step.lrs[0] for step in run.steps[first:last] if not step.skipped)
            if adam
            else learning_rate_time(run, first, last)
        )
        models = [context.load_model(index) for index in group]
        curvature = context.fit_curvature(
            kind, models[-1], solver=solver, subset=subset
        )  # at the segment's last weights
        report.update(curvature.solver_report or {})
        scale = scales.get(group[-1])
        if scale is not None:  # Adam: functions of S (G + l2) S + decoupled, in the coordinates s = r / S
            settings = run.optimizer_groups[0]
            decoupled = run.manifest.optimizer == "AdamW" or bool(settings.get("decoupled_weight_decay"))
            curvature = PreconditionedGGN(
                curvature,
                scale,
                l2=0.0 if decoupled else run.weight_decay,
                decoupled=run.weight_decay if decoupled else 0.0,
            )
            adjoint = adjoint * scale.to(adjoint)
        assert isinstance(curvature, SpectralCurvature)

        def contribution(e: Tensor, time: float = time) -> Tensor:
            c = e + weight_decay
            # (1 - exp(-T c)) / c, and its limit T as c -> 0
            return torch.where(c * time > 1e-8, -torch.expm1(-time * c) / c.clamp(min=1e-30), torch.full_like(c, time))

        def decay(e: Tensor, time: float = time) -> Tensor:
            return torch.exp(-time * (e + weight_decay))

        weighted, adjoint = curvature.apply_functions([contribution, decay], adjoint)
        if scale is not None:
            weighted, adjoint = weighted * scale.to(weighted), adjoint / scale.to(adjoint)
        if isinstance(curvature, (KrylovGGN, PreconditionedGGN)) and curvature.reports:
            products += curvature.reports[-1]["lanczos_products"]
        for model in models:  # the example's gradient, averaged over the segment's snapshots
            effects += context.contract(model, weighted / num_train) / len(group)
    return effects, {**report, "lanczos_products": products} if products else report
