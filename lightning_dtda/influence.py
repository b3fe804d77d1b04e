"""``Attributor``: per-seed influence of every training example on every query, from recorded runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lightning_dtda._io import load_torch, save_torch
from lightning_dtda.curvature import CURVATURES, SpectralCurvature, check_spectral, fit_curvature
from lightning_dtda.data import fingerprint_dataset
from lightning_dtda.distributed import gather_columns, rank_and_world, shard
from lightning_dtda.gradients import stream_gradients, trainable_parameters
from lightning_dtda.hooks import Hooks
from lightning_dtda.reporting import log_result
from lightning_dtda.result import AttributionResult
from lightning_dtda.segmented import segmented_effects
from lightning_dtda.trajectory import Trajectory, instantiate, load_runs
from lightning_dtda.unrolled import unrolled_effects

METHODS = ("influence", "unrolled", "segmented")


class _InputsTargets:
    """Re-iterable ``(X, y)`` batches of a dataset, as curvlinops consumes them."""

    def __init__(self, data: Dataset, hooks: Hooks, batch_size: int, device: torch.device) -> None:
        self.loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        self.hooks = hooks
        self.device = device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader:
            yield self.hooks.inputs_targets(move_data_to_device(batch, self.device))


def _as_loggers(loggers: Logger | Sequence[Logger] | pl.Trainer | None) -> list[Logger]:
    if loggers is None:
        return []
    if isinstance(loggers, pl.Trainer):
        return list(loggers.loggers)
    if isinstance(loggers, Logger):
        return [loggers]
    return list(loggers)


class Attributor:
    r"""Predict, for every recorded seed, how removing each training example changes each query's measurement.

    For each run the module is loaded at its final snapshot and the effect of removing training
    example ``n`` on query ``q`` is the influence-function estimate

    .. math::
        \Delta m_{q,n} = \nabla m_q^\top (C + \lambda I)^{-1} \nabla \ell_n / N,

    where ``C`` is the curvature of the mean training loss (see ``curvature``), ``N`` the training set
    size, ``m_q`` the measurement hook and ``l_n`` the per-example training loss hook. Only the ``Q``
    query gradients are solved; training gradients are streamed and contracted, so memory stays
    ``O(batch_size x P + Q x P + curvature)``.

    Damping ``"auto"`` is ``1 / (sum over steps of the learning rate / (1 - momentum)) +
    weight_decay``. Why: a run of total learning-rate "time" ``T`` has moved the weights along a
    direction of curvature ``c`` only if ``c * T`` is not small; unrolled differentiation of such a
    run responds to an example's gradient by ``(1 - exp(-c T)) / c``, which the damped inverse
    ``1 / (c + 1/T)`` follows at both ends (``T`` for flat directions, ``1/c`` for converged ones).
    Weight decay is part of the training objective's curvature, so it is added as is.

    Args:
        module: The LightningModule class (instantiated from each run's recorded hyperparameters) or
            an instance (copied; the original is left untouched).
        runs: A run folder, a folder of run folders, or already loaded :class:`Trajectory` objects.
        train_data: The training set in the recorded index order: the dataset of the DataLoader the
            runs trained on. Its length and fingerprint must match the recorded ones.
        curvature: ``"ekfac"`` (default), ``"kfac"``, ``"ggn"`` or ``"identity"``.
        damping: ``"auto"`` (per run, see above) or a positive float.
        method: ``"influence"`` (the formula above, at the final snapshot), ``"unrolled"`` (exact
            first-order effects by differentiating through the replayed run; see ``unrolled``; ignores
            curvature and damping; see ``relu_smoothing``) or ``"segmented"`` (``segments`` segments of locally quadratic
            training in the ``"ekfac"`` or ``"ggn"`` eigenbasis; see ``segmented``).
        segments: Number of segments for ``method="segmented"``.
        relu_smoothing: For ``method="unrolled"`` only: ``None`` (default) differentiates the run
            exactly; a width ``sigma > 0`` (in pre-activation units) stands a Gaussian of that width in
            for ReLU's kink in the replay's second derivatives, which predicts whole-example removals
            better on ReLU networks (see ``unrolled`` and the README's benchmark).
        batch_size: Examples per chunk of per-example gradients and per curvature batch.
        device: Where to compute; defaults to CUDA when available.
        progress: Show progress bars.
        cache_dir: If given, each run's effects are saved there (atomically) as soon as they are
            computed, keyed by the run's snapshot checksums, the data and the settings; a repeated call
            (after a crash, say) loads finished runs instead of recomputing them. Fitted curvatures
            (dense GGN eigendecompositions, K-FAC/EK-FAC factors) are cached there too, keyed by the final
            snapshot, the training data and the curvature: new queries or another damping reuse them.

    Raises:
        ValueError: For an unknown method or curvature, a damping that is not positive, or training
            data that is not the data the runs were recorded on.

    Example::

        attributor = Attributor(MyModule, "runs/", train_set, curvature="ekfac")
        result = attributor.attribute(query_set, loggers=trainer)
        values, indices = result.top_k(query=0, k=5)
    """

    def __init__(
        self,
        module: type[pl.LightningModule] | pl.LightningModule,
        runs: str | Path | Sequence[Trajectory],
        train_data: Dataset,
        curvature: str = "ekfac",
        damping: float | str = "auto",
        method: str = "influence",
        segments: int = 4,
        relu_smoothing: float | None = None,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        progress: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
        if damping != "auto" and not (isinstance(damping, (int, float)) and damping > 0):
            raise ValueError(f"damping must be 'auto' or a positive number, got {damping!r}.")
        if relu_smoothing is not None and (method != "unrolled" or not relu_smoothing > 0):
            raise ValueError(
                f"relu_smoothing must be None or a positive width, and applies to method='unrolled' only; got "
                f"relu_smoothing={relu_smoothing!r} with method={method!r}."
            )
        self.module = module
        self.runs = load_runs(runs) if isinstance(runs, (str, Path)) else list(runs)
        self.train_data = train_data
        self.method = method
        self.segments = segments
        self.relu_smoothing = relu_smoothing
        self.curvature = curvature
        self.damping = damping
        self.batch_size = batch_size
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.runs[0].check_dataset(train_data)

    def damping_for(self, run: Trajectory) -> float:
        """The damping used for ``run``: the given float, or the ``"auto"`` rule."""
        if self.damping != "auto":
            return float(self.damping)
        return 1.0 / run.learning_rate_time() + run.weight_decay

    def load_model(self, run: Trajectory, snapshot: int = -1) -> nn.Module:
        """The module at a snapshot of ``run`` (default: the final one), in eval mode on ``self.device``."""
        return instantiate(self.module, run, snapshot, self.device)

    def attribute_run(self, run: Trajectory, query_data: Dataset) -> tuple[Tensor, Tensor, float | None]:
        """Effects ``[queries, train]``, base measurements ``[queries]`` and the damping (``None`` for
        ``"unrolled"``), for one run."""
        model = self.load_model(run)
        hooks = Hooks(model)
        query_grads = torch.cat(
            [g for _, g in stream_gradients(model, hooks.measurement, query_data, self.batch_size, self.device, self.progress, "query gradients")]
        )
        with torch.no_grad():
            measurements = torch.cat(
                [hooks.measurement(move_data_to_device(b, self.device)) for b in DataLoader(query_data, batch_size=self.batch_size)]
            ).cpu()
        if self.method == "unrolled":
            effects = unrolled_effects(model, run, self.train_data, query_grads, self.progress, self.relu_smoothing)
            return effects.cpu(), measurements, None
        first_batch = move_data_to_device(next(iter(DataLoader(self.train_data, batch_size=2))), self.device)
        loss_function = hooks.loss_function(first_batch) if self.curvature != "identity" else None
        if self.method == "segmented":

            def fit(snapshot_model: nn.Module) -> SpectralCurvature:
                snapshot_data = _InputsTargets(self._train_shard(), Hooks(snapshot_model), self.batch_size, self.device)
                params = list(trainable_parameters(snapshot_model).values())
                check_spectral(self.curvature, sum(p.numel() for p in params))
                curvature = fit_curvature(self.curvature, snapshot_model, loss_function, params, snapshot_data, run.dataset_length)
                assert isinstance(curvature, SpectralCurvature)
                return curvature

            effects = segmented_effects(
                run,
                query_grads,
                self.segments,
                load_model=lambda index: self.load_model(run, index),
                fit=fit,
                contract=lambda snapshot_model, vectors: self.contract(snapshot_model, Hooks(snapshot_model), vectors),
            )
            return effects.cpu(), measurements, None
        damping = self.damping_for(run)
        data = _InputsTargets(self._train_shard(), hooks, self.batch_size, self.device)
        params = list(trainable_parameters(model).values())
        curvature = self._fit_or_load_curvature(run, model, loss_function, params, data)
        return self.contract(model, hooks, curvature.solve(query_grads, damping) / run.dataset_length).cpu(), measurements, damping

    def _fit_or_load_curvature(self, run: Trajectory, model: nn.Module, loss_function: nn.Module | None, params: list, data: Any):
        """Fit the curvature at ``run``'s final weights, or load it from ``cache_dir``: the fit depends on
        the weights and the training data, not on the queries or the damping."""
        path = None
        if self.cache_dir is not None:
            key = {"snapshot": run.manifest["snapshots"][-1]["sha256"], "train": run.dataset_fingerprint, "curvature": self.curvature}
            path = self._cache_file(run, f"curvature-{self.curvature}", key)
        state = load_torch(path) if path is not None and path.is_file() else None
        curvature = fit_curvature(self.curvature, model, loss_function, params, data, run.dataset_length, self.progress, state)
        if path is not None and state is None and rank_and_world()[0] == 0 and (fitted := curvature.state()) is not None:
            save_torch(fitted, path)
        return curvature

    def _train_shard(self) -> Subset:
        """This process's share of the training set (all of it unless torch.distributed runs)."""
        return Subset(self.train_data, shard(len(self.train_data)))  # type: ignore[arg-type]

    def contract(self, model: nn.Module, hooks: Hooks, vectors: Tensor) -> Tensor:
        """``vectors [Q, P] @ (per-example training gradients [N, P]).T``, streamed in chunks: ``[Q, N]``."""
        part = self._train_shard()
        effects = torch.empty(len(vectors), len(part), dtype=vectors.dtype, device=self.device)
        for rows, grads in stream_gradients(
            model, hooks.train_loss, part, self.batch_size, self.device, self.progress, "train gradients", part.indices[0] if len(part) else 0
        ):
            effects[:, rows] = vectors @ grads.T
        return gather_columns(effects, len(self.train_data))  # type: ignore[arg-type]

    def cache_path(self, run: Trajectory, query_fingerprint: str) -> Path:
        """Where ``run``'s effects are cached: named by a hash of everything they depend on."""
        snapshots = run.manifest["snapshots"] if self.method != "influence" else run.manifest["snapshots"][-1:]
        key = {
            "module": run.module_class,
            "snapshots": [entry["sha256"] for entry in snapshots],
            "train": run.dataset_fingerprint,
            "queries": query_fingerprint,
            "settings": [self.method, self.curvature, self.damping, self.segments if self.method == "segmented" else None, self.relu_smoothing],
        }
        return self._cache_file(run, f"{self.method}-{self.curvature}", key)

    def _cache_file(self, run: Trajectory, label: str, key: dict[str, Any]) -> Path:
        assert self.cache_dir is not None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{run.name}-{label}-{digest}.pt"

    def _cached_attribute_run(self, run: Trajectory, query_data: Dataset, query_fingerprint: str) -> tuple[Tensor, Tensor, float | None]:
        if self.cache_dir is None:
            return self.attribute_run(run, query_data)
        path = self.cache_path(run, query_fingerprint)
        if path.is_file():
            cached = load_torch(path)
            return cached["effects"], cached["measurements"], cached["damping"]
        effects, measurements, damping = self.attribute_run(run, query_data)
        if rank_and_world()[0] == 0:
            save_torch({"effects": effects, "measurements": measurements, "damping": damping}, path)
        return effects, measurements, damping

    def attribute(
        self,
        query_data: Dataset,
        loggers: Logger | Sequence[Logger] | pl.Trainer | None = None,
        top_k: int = 5,
    ) -> AttributionResult:
        """Attribute every query to every training example, in every run.

        Args:
            query_data: Query examples, batched like the training data; the measurement hook is
                evaluated on them.
            loggers: Lightning loggers (or a Trainer, whose loggers are used) that receive a table of
                each query's ``top_k`` helpful and harmful examples and a histogram of the effects.
            top_k: Rows per query and kind in the logged table.

        Returns:
            An :class:`AttributionResult` with ``effects [seeds, queries, train]``.
        """
        if len(query_data) == 0:  # type: ignore[arg-type]
            raise ValueError("query_data is empty; pass at least one query example.")
        effects, measurements, dampings = [], [], []
        query_fingerprint = fingerprint_dataset(query_data) if self.cache_dir is not None else ""
        for run in tqdm(self.runs, desc=f"attributing ({self.method}, {self.curvature})", disable=not self.progress):
            e, m, d = self._cached_attribute_run(run, query_data, query_fingerprint)
            effects.append(e)
            measurements.append(m)
            dampings.append(d)
        result = AttributionResult(
            torch.stack(effects),
            torch.stack(measurements),
            [run.name for run in self.runs],
            {
                "method": self.method,
                "segments": self.segments if self.method == "segmented" else None,
                "relu_smoothing": self.relu_smoothing,
                "curvature": self.curvature,
                "damping": self.damping,
                "damping_per_run": dampings,
                "seeds": [run.seed for run in self.runs],
                "snapshot_steps": [run.final_step for run in self.runs],
                "module": self.runs[0].module_class,
                "dataset_fingerprint": self.runs[0].dataset_fingerprint,
                "versions": self.runs[0].manifest["versions"],
            },
        )
        if rank_and_world()[0] == 0:
            log_result(result, _as_loggers(loggers), k=top_k)
        return result
