"""Fitting a curvature of a model's mean training loss, or rebuilding a cached one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from curvlinops import (
    GGNLinearOperator,
)
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_dtda.curvature._curvlinops import SummedOverRanks
from lightning_dtda.curvature.attention import factorable_attention
from lightning_dtda.curvature.base import (
    CURVATURES,
    Curvature,
    IdentityCurvature,
    dense_ggn,
    forward_differentiable_kernels,
)
from lightning_dtda.curvature.ggn import DenseGGN, KrylovGGN, choose_solver
from lightning_dtda.curvature.kfac import _fit_kfac
from lightning_dtda.hooks import call_model


def fit_curvature(
    kind: str,
    model: nn.Module,
    loss_function: nn.Module,
    params: list[nn.Parameter],
    data: Iterable[tuple[Tensor, Tensor]],
    num_data: int,
    progress: bool = False,
    state: dict[str, Any] | None = None,
    solver: str = "auto",
    num_columns: int | None = None,
) -> Curvature:
    """Fit curvature ``kind`` for ``loss_function(model(X), y)`` averaged over ``data`` at the current weights.

    Under torch.distributed, ``data`` is this rank's shard and ``num_data`` the full training set's
    size; the statistics are summed over ranks (see ``distributed``).

    Args:
        kind: One of ``"ekfac"``, ``"kfac"``, ``"ggn"``, ``"identity"``.
        model: Maps inputs ``X`` to outputs; in eval mode (the data pass must be deterministic).
        loss_function: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``, reduction ``"mean"``.
        params: The trainable parameters, in the order vectors are flattened.
        data: Re-iterable ``(X, y)`` batches covering the whole training set once.
        num_data: Number of training examples ``N``.
        progress: Show curvlinops' progress bars for the K-FAC factor passes.
        state: A fitted curvature's ``Curvature.state`` (cached on disk): rebuild from it, with no
            pass over the data.
        solver: For ``"ggn"``: ``"dense"`` (build and eigendecompose), ``"krylov"`` (matrix products
            only: ``KrylovGGN``) or ``"auto"``: by predicted time for solving ``num_columns`` vectors
            (``choose_solver``; its prediction lands in the curvature's ``solver_report``), or without
            ``num_columns`` (every training gradient solved: self-influence) dense up to
            ``DENSE_GGN_MAX_PARAMS`` parameters.
        num_columns: How many vectors each solve holds (query columns), for ``solver="auto"``.
    """
    if kind == "identity":
        return IdentityCurvature()
    model, data = _as_curvlinops_takes_them(model, loss_function, data)
    # Determinism is checked by eval mode instead of curvlinops' probe, which costs two extra data passes.
    common = dict(check_deterministic=False, num_data=num_data, batch_size_fn=_batch_size)
    if kind == "ggn":
        # No progress bar here: curvlinops would draw one per matrix product, hundreds under CG.
        if state is not None:
            return DenseGGN(state["eigenvalues"], state["eigenvectors"])
        operator = GGNLinearOperator(model, loss_function, params, data, progressbar=False, **common)
        report = None
        if solver == "auto" and num_columns is not None:
            solver, report = choose_solver(SummedOverRanks(operator), num_columns)
        curvature = (
            DenseGGN.from_operator(operator)
            if dense_ggn(solver, operator.shape[0])
            else KrylovGGN(operator, progress=progress)
        )
        curvature.solver_report = report
        return curvature
    if kind in ("kfac", "ekfac"):
        # The operator finds its layers when it is built and collects factors in the data passes.
        with factorable_attention(model), forward_differentiable_kernels():
            return _fit_kfac(kind, model, loss_function, params, data, progress, state, common)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}.")


class _Called(nn.Module):
    """The model called as the hooks call it (``model(**inputs)`` for a dict), its ``[B]`` outputs made
    ``[B, 1]``: curvlinops calls ``model(X)``, and its K-FAC needs a class dimension."""

    def __init__(self, model: nn.Module, column: bool) -> None:
        super().__init__()
        self.model, self.column = model, column

    def forward(self, inputs: Any) -> Tensor:
        outputs = call_model(self.model, inputs)
        return outputs.unsqueeze(-1) if self.column else outputs


class _ColumnTargets:
    """Re-iterable ``(X, y)`` batches with ``y`` made ``[B, 1]``, to go with ``_Called``'s outputs."""

    def __init__(self, data: Iterable[tuple[Any, Tensor]]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for inputs, targets in self.data:
            yield inputs, targets.unsqueeze(-1)


def _as_curvlinops_takes_them(
    model: nn.Module, loss_function: nn.Module, data: Iterable[tuple[Any, Tensor]]
) -> tuple[nn.Module, Iterable[tuple[Any, Tensor]]]:
    # [B] outputs against [B] targets: the same mean squared error or binary cross-entropy as [B, 1]
    # against [B, 1] (the hooks refuse shapes that would broadcast).
    inputs, _ = next(iter(data))
    with torch.no_grad(), forward_differentiable_kernels():
        column = _Called(model, False)(inputs).ndim == 1 and not isinstance(loss_function, nn.CrossEntropyLoss)
    if isinstance(inputs, Tensor) and not column:
        return model, data  # as it is: cached K-FAC states name the model's own layers
    return _Called(model, column), _ColumnTargets(data) if column else data


def _batch_size(inputs: Any) -> int:
    # curvlinops reads X.shape[0]; inputs may be a dict or a tuple of tensors.
    return next(t for t in tree_leaves(inputs) if isinstance(t, Tensor)).shape[0]
