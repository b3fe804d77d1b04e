"""``Influence``: the damped influence function at a run's final weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Subset

from lightning_dtda.curvature.base import (
    CURVATURES,
    DENSE_GGN_LIMIT,
    Curvature,
    CurvatureSetting,
    SolverKind,
    check_solver,
    dense_ggn,
)
from lightning_dtda.curvature.ggn import KrylovGGN
from lightning_dtda.curvature.tracked import check_modules, tracked_parameters
from lightning_dtda.damping import auto_damping, fit_damping, grid_edge
from lightning_dtda.estimators.base import Estimator, RunContext, curvature_examples
from lightning_dtda.hooks import Hooks
from lightning_dtda.model.gradients import stream_gradients, trainable_parameters
from lightning_dtda.runs.format import SnapshotEntry
from lightning_dtda.runs.trajectory import Trajectory

# Query gradients that choose K-FAC's and EK-FAC's "auto" damping: one GGN product of this many
# columns per candidate damping.
DAMPING_PROBES = 16

# curvature="auto" takes the exact GGN by block CG, the most faithful curvature on every benchmark task at
# about EK-FAC's cost for tens of queries (docs/benchmarks/digits_dtda.md), unless its cost, which grows
# with the query columns while EK-FAC's hardly does, passes AUTO_MAX_COLUMNS (measured: benchmarks/default_curvature.py),
# or its blocks (about six float64 [P, columns] matrices) pass AUTO_BLOCK_BYTES of memory.
AUTO_MAX_COLUMNS = 64
AUTO_BLOCK_BYTES = 4 * 2**30
# Self-influence solves every training gradient, which block CG cannot: the exact GGN is built densely
# up to this many parameters (that many columns of products), EK-FAC above.
AUTO_SELF_INFLUENCE_DENSE = 1024


@dataclass(frozen=True)
class Influence(Estimator):
    r"""The influence-function estimate at each run's final snapshot (or the one the Attributor's ``snapshot`` names).

        \Delta m_{q,n} = \nabla m_q^\top (C + \lambda I)^{-1} \nabla \ell_n / N,

    where ``C`` is the curvature of the mean training loss, ``N`` the training set size, ``m_q``
    the measurement hook and ``l_n`` the per-example training loss hook. Only the ``Q`` query
    gradients are solved; training gradients are streamed and contracted, so memory stays
    ``O(batch_size x P + Q x P + curvature)``.

    Damping ``"auto"`` is ``1 / (sum over steps of the learning rate / (1 - momentum)) +
    weight_decay``. Why: a run of total learning-rate "time" ``T`` has moved the weights along a
    direction of curvature ``c`` only if ``c * T`` is not small; unrolled differentiation of such a
    run responds to an example's gradient by ``(1 - exp(-c T)) / c``, which the damped inverse
    ``1 / (c + 1/T)`` follows at both ends (``T`` for flat directions, ``1/c`` for converged ones).
    Weight decay is part of the training objective's curvature, so it is added as is. Under Adam the
    learning-rate time counts each step as ``lr`` times the median of Adam's per-entry multiplier
    ``1 / (sqrt(v_hat) + eps)`` (recorded at every snapshot), and AdamW's decoupled decay enters as
    ``weight_decay`` divided by that multiplier.

    That rule is right for the exact GGN. K-FAC and EK-FAC misplace curvature (they drop the
    cross-layer blocks), and their ``"auto"`` damping is fitted per run instead: among ``lam_G * 10^(k/2)``,
    ``k = -4 .. 8`` (``lam_G`` the rule above), the one whose damped solves of the first 16 query
    gradients point most nearly the way of the exact damped-GGN solves, measured in the exact system's
    energy norm (see ``fit_damping``): 13 GGN products of 16 columns.

    Tracked parameters: ``"ekfac"`` and ``"kfac"`` attribute through the parameters of the ``nn.Linear``,
    ``nn.Conv2d`` and ``nn.Embedding`` layers the forward calls and of ``nn.MultiheadAttention``
    (self-attention), as kronfluence does, and leave the others (normalisation layers, tied embeddings) out: the effects are then
    those through the tracked parameters only, the others held at their final values, with query
    gradients, training gradients and curvature all restricted to them. Their names go into each run's settings (``parameters``) and
    one line is logged. ``"ggn"`` and ``"identity"`` track every trainable parameter. ``modules``
    restricts either to named submodules.

    Curvature ``"auto"`` (the default) chooses per call, by the number of query columns ``Q`` (1 with
    ``reduce="mean"``) and trainable parameters ``P``: the exact GGN by block CG, the most faithful on
    every benchmark task at about EK-FAC's cost, for up to 64 columns whose CG blocks (about ``48 P Q``
    bytes) stay within 4 GiB; EK-FAC beyond. Self-influence (every training gradient solved): the dense
    GGN up to 1,024 parameters, EK-FAC above. The choice and its reason are logged and go into the
    result's settings (``curvature``, ``curvature_reason``).

    Args:
        curvature: ``"auto"`` (default, see above), ``"ekfac"``, ``"kfac"`` (curvlinops' Kronecker
            factorisations of the exact GGN; ``nn.Linear`` and ``nn.Conv2d`` parameters, see above),
            ``"ggn"`` (exact, any layer) or ``"identity"`` (``C = 0``: scaled gradient dot products).
        damping: ``"auto"`` (per run, see above) or a positive float.
        solver: How ``"ggn"`` is solved: ``"dense"`` (the matrix built and eigendecomposed; up to
            32,768 parameters), ``"krylov"`` (block conjugate gradients on GGN products, all queries at
            once, preconditioned by a randomized Nystrom sketch of the GGN; any size) or ``"auto"``: the
            one predicted faster from one timed product (``P`` columns of products and an ``eigh`` against
            the expected CG products of the query columns; see ``choose_solver``), recorded in each run's
            settings (``solver``, ``solver_reason``); for self-influence dense up to 4,096 parameters. The products taken and the final relative residual go into each run's
            settings (``cg_products``, ``cg_residual``, ``cg_seconds``; the sketch's ``nystrom_rank`` and
            ``nystrom_seconds``).
        curvature_subset: Fit the curvature on this many training examples drawn at random (the same
            draw for every run) instead of all of them; the gradients contracted are still all ``N``.
        modules: Names of submodules (as in ``model.named_modules()``) to attribute through, e.g.
            ``["encoder.layers.0", "head"]``; ``None`` (default): the whole model.

    Raises:
        ValueError: For an unknown curvature or solver, a solver for a curvature other than ``"ggn"``,
            a damping that is not positive or a subset that is not a positive integer; at attribution,
            for a module name the model lacks or one without parameters the curvature can track.

    Example:

        ```python
        Attributor(MyModule, "runs/", train_set, estimator=Influence(curvature="ggn", damping=1e-3))
        ```
    """

    # Literal types let a LightningCLI file be checked when it is parsed, before anything trains.
    curvature: CurvatureSetting = "auto"
    damping: Literal["auto"] | float = "auto"
    solver: SolverKind = "auto"
    curvature_subset: int | None = None
    modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.curvature not in ("auto", *CURVATURES):
            raise ValueError(f"curvature must be 'auto' or one of {CURVATURES}, got {self.curvature!r}.")
        check_solver(self.curvature, self.solver, self.curvature_subset)
        object.__setattr__(self, "modules", check_modules(self.modules))
        if self.damping != "auto" and (
            isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping > 0
        ):
            raise ValueError(f"damping must be 'auto' or a positive number, got {self.damping!r}.")

    def resolve(
        self, runs: Sequence[Trajectory], num_params: Callable[[], int], num_columns: int | None
    ) -> tuple["Influence", str | None]:
        """For ``curvature="auto"``, the curvature to use (see the class docstring) and why."""
        if self.curvature != "auto":
            return self, None
        if num_columns is None:
            params = num_params()
            if params <= AUTO_SELF_INFLUENCE_DENSE:
                return replace(self, curvature="ggn", solver="dense"), (
                    f"self-influence solves all training gradients: the exact GGN built densely ({params} parameters)"
                )
            return replace(self, curvature="ekfac"), (
                f"self-influence solves all training gradients, which block CG cannot; the dense GGN of {params} "
                f"parameters would take {params} columns of products: EK-FAC (Influence('ggn') builds it anyway, up "
                "to 4,096 parameters)"
            )
        if num_columns > AUTO_MAX_COLUMNS:
            return replace(self, curvature="ekfac"), (
                f"{num_columns} query columns: block CG's cost grows with them, EK-FAC's hardly does (above "
                f"{AUTO_MAX_COLUMNS}); for the exact GGN pass curvature='ggn', fewer queries or reduce='mean'"
            )
        block = 48 * num_params() * num_columns
        if block > AUTO_BLOCK_BYTES:
            return replace(self, curvature="ekfac"), (
                f"block CG on {num_columns} query columns would hold {block / 2**30:.1f} GiB of blocks (above "
                f"{AUTO_BLOCK_BYTES / 2**30:.0f}): EK-FAC; for the exact GGN pass curvature='ggn' or fewer queries"
            )
        return replace(self, curvature="ggn"), (
            f"the exact GGN ({num_columns} query column{'s' if num_columns > 1 else ''}): the most faithful "
            "curvature, at about EK-FAC's cost"
        )

    def damping_for(self, run: Trajectory) -> float:
        """The given damping, or the ``"auto"`` rule for ``run`` (for K-FAC/EK-FAC the start of the fitted
        damping, which the run's settings record)."""
        if self.damping != "auto":
            return float(self.damping)
        return auto_damping(run)

    def snapshots_used(self, run: Trajectory) -> tuple[SnapshotEntry, ...]:
        return run.snapshots[-1:]

    def tracked_parameters(self, model: nn.Module, batch: Any) -> list[str]:
        return tracked_parameters(model, self.curvature, self.modules, batch)

    def _fit(self, context: RunContext, probes: Tensor | None) -> tuple[Curvature, float, dict[str, Any]]:
        """The curvature at the final weights, its damping (K-FAC/EK-FAC "auto": fitted on ``probes [K, P]``)
        and what to report about the damping."""
        damping = self.damping_for(context.run)
        curvature = context.fit_curvature(
            self.curvature, context.model, cache=True, solver=self.solver, subset=self.curvature_subset
        )
        report: dict[str, Any] = dict(curvature.solver_report or {})
        if self.damping == "auto" and self.curvature in ("kfac", "ekfac"):
            ggn = context.fit_curvature("ggn", context.model, solver="krylov", subset=self.curvature_subset)
            assert isinstance(ggn, KrylovGGN)
            report["ggn_damping"] = damping
            fitted, totals = fit_damping(curvature, ggn, probes, damping)
            edge = grid_edge(totals)
            if edge is not None:
                report["damping_at_grid_edge"] = edge
                name = "EK-FAC" if self.curvature == "ekfac" else "K-FAC"
                rank_zero_warn(
                    f"Influence({self.curvature!r}) on {context.run.name}: the fitted damping {fitted:.3g} is the "
                    f"{edge} candidate ({fitted / damping:g} x the GGN's {damping:.3g}), so {name}'s "
                    "solves would point more like the exact GGN's beyond the range searched: they are far from "
                    "them here, and its effects' scale is not fitted at all. Compare with Influence('ggn'), or "
                    "give a damping."
                )
            damping = fitted
        return curvature, damping, report

    def estimate(self, context: RunContext) -> tuple[Tensor, dict[str, Any]]:
        curvature, damping, report = self._fit(context, context.query_grads[:DAMPING_PROBES])
        solved = curvature.solve(context.query_grads, damping) / context.num_train
        if isinstance(curvature, KrylovGGN):
            report.update(curvature.reports[-1])
        return context.contract(context.model, solved), {"damping": damping, **report}

    def self_influence(self, context: RunContext) -> tuple[Tensor, dict[str, Any]]:
        r"""``g_n^T (C + \lambda I)^{-1} g_n / N`` for every training example ``n``, ``[train]``: the diagonal of
        ``estimate`` with the training set as queries and the training loss as measurement, without the
        ``[N, N]`` matrix. Each chunk of ``batch_size`` training gradients is solved and dotted with itself.

        K-FAC/EK-FAC "auto" damping is fitted as for queries, on the training gradients of
        ``DAMPING_PROBES`` examples drawn at random (the fixed draw of ``curvature_examples``): they are
        the vectors solved here.

        Raises:
            ValueError: For the exact GGN solved by Krylov methods (block CG on every chunk).
        """
        named = trainable_parameters(context.model)
        num_params = sum(named[name].numel() for name in (context.params or named))
        if self.curvature == "ggn" and not dense_ggn(self.solver, num_params):
            raise ValueError(
                f"Self-influence with the exact GGN by block conjugate gradients would solve all N={context.num_train} "
                f"training gradients: one CG run (tens to hundreds of passes over the curvature's data) per chunk of "
                f"{context.batch_size}. With {num_params} parameters, use solver='dense' (up to {DENSE_GGN_LIMIT} "
                "parameters) or curvature='ekfac'; for the exact values of a few examples, attribute(Subset(train_data, "
                "indices)) and read effects[:, i, indices[i]]."
            )
        hooks = Hooks(context.model)
        probe_examples = Subset(context.train_data, curvature_examples(context.num_train, DAMPING_PROBES))
        probes = (
            torch.cat(
                [
                    g
                    for _, g in stream_gradients(
                        context.model,
                        hooks.train_loss,
                        probe_examples,
                        context.batch_size,
                        context.device,
                        False,
                        "probes",
                        wrt=context.params,
                    )
                ]
            )
            if self.damping == "auto" and self.curvature in ("kfac", "ekfac")
            else None
        )
        curvature, damping, report = self._fit(context, probes)
        values = context.self_contract(context.model, lambda grads: curvature.solve(grads, damping)) / context.num_train
        return values, {"damping": damping, **report}
