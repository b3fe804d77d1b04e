"""The estimator protocol, and what the Attributor hands an estimator for one run.

An estimator is a small frozen dataclass holding only its own settings. ``estimate(context)``
returns one run's removal effects ``[Q, N]`` and a dict of what it chose for that run (the damping,
say). Its ``Estimator.settings`` are both the cache key of its results and what a saved
``AttributionResult`` records, so a result says exactly how it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_dtda._io import load_tree, save_tree
from lightning_dtda.cache import curvature_file
from lightning_dtda.curvature.base import Curvature
from lightning_dtda.curvature.fit import fit_curvature
from lightning_dtda.curvature.ggn import ggn_batch_size
from lightning_dtda.hooks import Hooks, first_batch
from lightning_dtda.model.gradients import stream_gradients, trainable_parameters
from lightning_dtda.model.instantiate import instantiate
from lightning_dtda.runs.format import SnapshotEntry
from lightning_dtda.runs.trajectory import Trajectory
from lightning_dtda.sharding import gather_columns, rank_and_world, shard


class Estimator:
    """Base class of the estimators (``Influence``, ``Unrolled``, ``Segmented``).

    Subclasses are frozen dataclasses that validate their settings in ``__post_init__`` and implement
    ``estimate``.
    """

    def estimate(self, context: "RunContext") -> tuple[Tensor, dict[str, Any]]:
        """Removal effects ``[queries, train]`` for ``context.run`` (sign: the predicted change of the
        measurement when the example is removed), and what was chosen for this run (JSON-able)."""
        raise NotImplementedError

    def self_influence(self, context: "RunContext") -> tuple[Tensor, dict[str, Any]]:
        """Each training example's removal effect on its own training loss, ``[train]``, for ``context.run``
        (same sign as ``estimate``), and what was chosen for this run (JSON-able).

        Raises:
            ValueError: Unless the estimator gets it without one estimate per example (the default).
        """
        raise ValueError(
            f"{type(self).__name__} gives effects one measurement at a time (an adjoint pass through the run per "
            "measurement), so self-influence would cost N attributions. Use Influence() (curvature 'ekfac', 'kfac', "
            "'ggn' or 'identity'); for a few examples, attribute(Subset(train_data, indices)) with the default "
            "measurement (the loss) and read effects[:, i, indices[i]]."
        )

    def resolve(
        self, runs: Sequence[Trajectory], num_params: Callable[[], int], num_columns: int | None
    ) -> tuple["Estimator", str | None]:
        """The estimator to run on ``runs`` for ``num_columns`` query columns (``None``: self-influence) on a
        model of ``num_params()`` trainable parameters, and why, where a setting is ``"auto"``; ``(self, None)``
        if none is."""
        return self, None

    def settings(self) -> dict[str, Any]:
        """``{"estimator": class name, **fields}``: the cache key and ``AttributionResult.settings["estimator"]``."""
        return {"estimator": type(self).__name__, **asdict(self)}  # type: ignore[call-overload]

    @property
    def label(self) -> str:
        """A short name for files and progress bars, e.g. ``influence-ekfac``."""
        curvature = getattr(self, "curvature", None)
        return type(self).__name__.lower() + (f"-{curvature}" if curvature else "")

    def snapshots_used(self, run: Trajectory) -> tuple[SnapshotEntry, ...]:
        """The snapshots the effects depend on (part of the cache key); all of them unless overridden."""
        return run.snapshots

    def tracked_parameters(self, model: nn.Module, batch: Any) -> list[str]:
        """Names of the parameters the effects are taken through (``batch``: a training batch, for
        estimators that must run the model to tell); all trainable ones unless overridden."""
        return list(trainable_parameters(model))


class _InputsTargets:
    """Re-iterable ``(X, y)`` batches of a dataset, as curvlinops consumes them."""

    def __init__(self, data: Dataset, hooks: Hooks, batch_size: int, device: torch.device) -> None:
        self.loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        self.hooks = hooks
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader:
            yield self.hooks.inputs_targets(move_data_to_device(batch, self.device))


@dataclass
class RunContext:
    """What an estimator needs for one run, prepared by the Attributor.

    Attributes:
        run: The recorded run.
        module: The LightningModule class or instance the Attributor was given.
        model: The module at the run's final snapshot, in eval mode on ``device``.
        query_grads: ``[Q, P]`` measurement gradients at the final weights.
        query_data: The queries.
        train_data: The whole training set, in recorded index order.
        batch_size: Examples per chunk of gradients and per curvature batch.
        device: Where to compute.
        progress: Show progress bars.
        cache_dir: Where fitted curvatures are cached, or ``None``.
        params: Names of the parameters ``query_grads`` are taken with respect to, which training
            gradients and curvatures use too (``None``: all trainable ones).
        reduce: ``"mean"`` when the queries' mean measurement is attributed as one query (``query_grads``
            is then ``[1, P]``), else ``None``.
    """

    run: Trajectory
    module: type[nn.Module] | nn.Module
    model: nn.Module
    query_grads: Tensor
    query_data: Dataset
    train_data: Dataset
    batch_size: int
    device: torch.device
    progress: bool
    cache_dir: Path | None
    params: list[str] | None = None
    reduce: str | None = None

    @property
    def num_train(self) -> int:
        return self.run.dataset_length

    def load_model(self, snapshot: int = -1) -> nn.Module:
        """The module at snapshot ``snapshot`` of the run, in eval mode on ``device`` (the Attributor built it
        once already and warned about what differs from the run)."""
        return instantiate(self.module, self.run, snapshot, self.device, warn=False)

    def train_shard(self) -> Subset:
        """This process's share of the training set (all of it unless torch.distributed runs)."""
        return Subset(self.train_data, shard(len(self.train_data)))  # type: ignore[arg-type]

    def train_gradients(self, model: nn.Module) -> Iterator[tuple[slice, Tensor]]:
        """This process's shard of the per-example training-loss gradients at ``model``'s weights, with
        respect to ``params``: ``(positions in the shard, gradients [chunk, P])`` in order."""
        part = self.train_shard()
        first = part.indices[0] if len(part) else 0
        return stream_gradients(
            model,
            Hooks(model).train_loss,
            part,
            self.batch_size,
            self.device,
            self.progress,
            "train gradients",
            first,
            self.params,
        )

    def contract(self, model: nn.Module, vectors: Tensor) -> Tensor:
        """``vectors [Q, P] @ (per-example training gradients at model's weights [N, P]).T``, streamed: ``[Q, N]``."""
        effects = torch.empty(len(vectors), len(self.train_shard()), dtype=vectors.dtype, device=self.device)
        for rows, grads in self.train_gradients(model):
            effects[:, rows] = vectors @ grads.T
        return gather_columns(effects, len(self.train_data))  # type: ignore[arg-type]

    def self_contract(self, model: nn.Module, transform: Callable[[Tensor], Tensor]) -> Tensor:
        """``(G * transform(G)).sum(1)`` for the per-example training gradients ``G [N, P]`` at ``model``'s
        weights, streamed in chunks of ``batch_size`` rows and sharded like ``contract``: ``[N]``."""
        local = torch.empty(len(self.train_shard()), dtype=next(model.parameters()).dtype, device=self.device)
        for rows, grads in self.train_gradients(model):
            local[rows] = (grads * transform(grads)).sum(1)
        return gather_columns(local.unsqueeze(0), len(self.train_data))[0]  # type: ignore[arg-type]

    def fit_curvature(
        self,
        kind: str,
        model: nn.Module,
        cache: bool = False,
        solver: str = "auto",
        subset: int | None = None,
    ) -> Curvature:
        """Curvature ``kind`` of the mean training loss at ``model``'s weights.

        With ``cache`` (only for the final snapshot's model) and a ``cache_dir``, the fitted state is
        saved and reused: the fit depends on the weights and the training data, not on the queries
        or the damping.

        Args:
            solver: How ``"ggn"`` is solved (see ``fit_curvature``; ``"auto"`` by predicted time for
                ``query_grads``' columns).
            subset: Fit on this many training examples drawn at random (a fixed draw per run size)
                instead of all of them.
        """
        hooks = Hooks(model)
        loss_function = None
        if kind != "identity":
            first = first_batch(self.train_data, self.device)
            loss_function = hooks.loss_function(first)
            if not hooks.default_train_loss:  # else the Attributor checked it already
                hooks.check_loss(first)
        path = None
        if cache and self.cache_dir is not None:
            tracked = (
                self.params if self.params is not None and self.params != list(trainable_parameters(model)) else None
            )
            path = curvature_file(self.cache_dir, self.run, kind, solver, subset, tracked)
        state = load_tree(path) if path is not None and path.is_file() else None
        examples = curvature_examples(len(self.train_data), subset)  # type: ignore[arg-type]
        # The solves hold the query columns; self-influence (no queries) solves every training gradient.
        columns = len(self.query_grads) or None
        batch_size = self.batch_size
        if kind == "ggn" and state is None:
            inputs, targets = hooks.inputs_targets(first)
            batch_size = ggn_batch_size(model, inputs, len(targets), columns or self.batch_size, self.batch_size)
        data = _InputsTargets(
            Subset(self.train_data, [examples[i] for i in shard(len(examples))]), hooks, batch_size, self.device
        )
        named = trainable_parameters(model)
        params = [named[name] for name in (self.params or named)]
        curvature = fit_curvature(
            kind, model, loss_function, params, data, len(examples), self.progress, state, solver, columns
        )
        if (
            path is not None
            and state is None
            and rank_and_world()[0] == 0
            and (fitted := curvature.state()) is not None
        ):
            save_tree(fitted, path)
        return curvature


def measurement_gradients(
    model: nn.Module,
    query_data: Dataset,
    batch_size: int,
    device: torch.device,
    progress: bool,
    reduce: str | None = None,
    wrt: list[str] | None = None,
    desc: str = "query gradients",
) -> Tensor:
    """Per-query measurement gradients ``[Q, P]`` (``wrt`` as for ``stream_gradients``), or with ``reduce="mean"``
    their mean ``[1, P]``, summed chunk by chunk: effects are linear in the query gradient, so the mean
    measurement needs neither ``[Q, P]`` nor ``[Q, N]``."""
    chunks = stream_gradients(model, Hooks(model).measurement, query_data, batch_size, device, progress, desc, wrt=wrt)
    if reduce == "mean":
        return sum(g.sum(0, keepdim=True) for _, g in chunks) / len(query_data)  # type: ignore[arg-type,return-value]
    return torch.cat([g for _, g in chunks])


def curvature_examples(num_train: int, subset: int | None) -> list[int]:
    """The training examples a curvature is fitted on: all, or ``subset`` of them drawn without
    replacement by a generator seeded with 0 (the same draw for every run of a training set)."""
    if subset is None or subset >= num_train:
        return list(range(num_train))
    return sorted(torch.randperm(num_train, generator=torch.Generator().manual_seed(0))[:subset].tolist())
