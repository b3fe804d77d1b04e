"""``Attributor``: per-seed removal effects of every training example on every query, from recorded runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from lightning_dtda._io import load_tree, save_tree
from lightning_dtda.cache import effects_file
from lightning_dtda.curvature.embedding import check_embeddings
from lightning_dtda.curvature.tracked import describe_tracked
from lightning_dtda.estimators import Estimator, Influence, RunContext
from lightning_dtda.estimators.base import measurement_gradients
from lightning_dtda.hooks import Hooks, first_batch
from lightning_dtda.model.gradients import quiet_batching_rules, trainable_parameters
from lightning_dtda.model.instantiate import instantiate
from lightning_dtda.replay.optim import check_optimized
from lightning_dtda.reporting.loggers import log_result
from lightning_dtda.results.result import AttributionResult, SelfInfluence
from lightning_dtda.runs.fingerprint import SeededDataset, fingerprint_dataset
from lightning_dtda.runs.trajectory import Trajectory, metric_driven, runs_to_attribute
from lightning_dtda.sharding import rank_and_world


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

    The Attributor coordinates; the ``estimator`` computes. For each run it loads the module at the
    final snapshot (or the one ``snapshot`` names), computes the query gradients and base measurements, hands them to the estimator
    (``Influence``, ``Unrolled`` or
    ``Segmented``), caches what it returns, and pools the runs into an
    ``AttributionResult`` of effects ``[seeds, queries, train]``. Sign: an effect is the
    predicted change of the measurement when the example is *removed*.

    Args:
        module: The LightningModule class (instantiated from each run's recorded hyperparameters) or
            an instance (copied; the original is left untouched).
        runs: A run folder, a folder of run folders, or already loaded ``Trajectory`` objects. A
            folder with a run that has not finished is refused (see ``load_runs``).
        train_data: The training set in the recorded index order: the dataset of the DataLoader the
            runs trained on. Its length and fingerprint must match the recorded ones.
        estimator: How effects are estimated per run. Default: ``Influence()`` (the exact GGN for up to 64 query
            columns, EK-FAC beyond; ``"auto"`` damping; see ``Influence``).
        batch_size: Examples per chunk of per-example gradients and per curvature batch.
        device: Where to compute; defaults to CUDA when available.
        progress: Show progress bars.
        cache_dir: If given, each run's effects are saved there (atomically) as soon as they are
            computed, keyed by the snapshots they depend on, the data and the estimator's settings; a
            repeated call (after a crash, say) loads finished runs instead of recomputing them. Fitted
            curvatures at the final snapshot (dense GGN eigendecompositions, K-FAC/EK-FAC factors) are
            cached there too: new queries or another damping reuse them.
        snapshot: Which weights of each run are attributed: ``"final"`` (the end of training, the default),
            ``"best"`` (``ModelCheckpoint``'s best checkpoint, which the recorder snapshots with every
            checkpoint it sees saved) or a snapshot's step. Estimators see the run as if it had ended
            there: ``Influence`` at those weights, ``Unrolled`` and ``Segmented`` up to that step.

    Raises:
        TypeError: If ``estimator`` is not an ``Estimator``, or
            ``train_data`` is a ``DataLoader`` or an ``IterableDataset``.
        ValueError: If the training data is not the data the runs were recorded on, or ``device`` names
            CUDA on a machine without it.

    Example:

        ```python
        attributor = Attributor(MyModule, "runs/", train_set, estimator=Influence(curvature="ekfac"))
        result = attributor.attribute(query_set, loggers=trainer)
        values, indices = result.top_k(query=0, k=5)
        ```
    """

    def __init__(
        self,
        module: type[pl.LightningModule] | pl.LightningModule,
        runs: str | Path | Sequence[Trajectory],
        train_data: Dataset,
        estimator: Estimator | None = None,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        progress: bool = True,
        cache_dir: str | Path | None = None,
        snapshot: Literal["final", "best"] | int = "final",
    ) -> None:
        estimator = Influence() if estimator is None else estimator
        if not isinstance(estimator, Estimator):
            raise TypeError(
                f"estimator must be an Estimator such as Influence(), Unrolled() or Segmented(), got {estimator!r}."
            )
        if isinstance(train_data, DataLoader):
            raise TypeError(
                "train_data is a DataLoader; pass its dataset (train_loader.dataset), in the order the runs were "
                "recorded on: attribution indexes training examples by their position."
            )
        if isinstance(train_data, IterableDataset):
            raise TypeError(
                "train_data is an IterableDataset; attribution indexes training examples by their position, so it needs "
                "a map-style Dataset (with __len__ and __getitem__) in the order the runs were recorded on."
            )
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}, but torch finds no CUDA device here; use device='cpu' or leave device=None."
            )
        self.module = module
        self.runs = runs_to_attribute(runs, train_data, snapshot)
        self.snapshot = snapshot
        # Every read of a training example draws the same random numbers (one fixed view of an augmented example).
        self.train_data = SeededDataset(train_data, self.runs[0].manifest.input_dtype)
        self.estimator = estimator
        self.batch_size = batch_size
        self.progress = progress
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        driven = metric_driven(self.runs)
        if driven is not None:
            rank_zero_warn(
                f"Attributor: {driven} followed a validation metric. The effects are those on runs as recorded; without "
                "an example a run may also stop at another epoch, or lower its learning rate at another step, which no "
                "estimator sees (and which can move an effect by as much as the largest effects; see the recording "
                "guide)."
            )
        half = sorted(
            {run.manifest.precision for run in self.runs if run.manifest.precision in ("16-true", "bf16-true")}
        )
        if half:
            # A new-user trial (bf16-true): effects came back in bfloat16, steps of 0.008 in a loss near 1.
            rank_zero_warn(
                f"Attributor: the runs trained in precision={half[0]!r}, so their models compute in half precision "
                "and the effects carry about three significant digits. Record in '32-true' (or '64-true') to "
                "attribute to more."
            )
        kept = [run for run in self.runs if run.manifest.best_step not in (None, run.final_step)]
        if snapshot == "final" and kept:
            rank_zero_info(
                "Attributor: attributing each run's final weights; ModelCheckpoint's best checkpoint is elsewhere in "
                + ", ".join(f"{run.name} (step {run.manifest.best_step} of {run.final_step})" for run in kept[:3])
                + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
                + ". snapshot='best' attributes the checkpoints you keep."
            )

    def load_model(self, run: Trajectory, snapshot: int = -1, warn: bool = True) -> torch.nn.Module:
        """The module at a snapshot of ``run`` (default: the final one), in eval mode on ``self.device``;
        ``warn``: about what differs from the run (see ``instantiate``)."""
        return instantiate(self.module, run, snapshot, self.device, warn)

    def _check_hooks(self, query_data: Dataset | None) -> torch.nn.Module:
        """Refuse, before anything runs or is said, a module whose batches its hooks (or their defaults) cannot read,
        or whose default loss would broadcast, on the first examples of the training and the query data; and one
        whose trainable parameters include some the run's optimizer was not given (``check_optimized``). Returns the
        first run's model it checked."""
        model = self.load_model(self.runs[0], warn=False)  # no warning here: the same build warns when attributed
        check_optimized(list(trainable_parameters(model)), self.runs[0].manifest.param_groups)
        Hooks(model).check_defaults(self.train_data, query_data, self.device)
        return model

    def _prepare(self, run: Trajectory, query_data: Dataset | None) -> tuple[torch.nn.Module, Hooks, list[str], bool]:
        """The model at ``run``'s final snapshot, its hooks, the names of the parameters the estimator tracks,
        and whether they leave some trainable ones out."""
        model = self.load_model(run)
        hooks = Hooks(model)
        first = first_batch(self.train_data, self.device)
        params = self.estimator.tracked_parameters(model, first)
        check_embeddings(model, params, getattr(self.estimator, "curvature", None) == "identity")
        subset = params != list(trainable_parameters(model))
        if subset and run is self.runs[0]:
            rank_zero_info(f"{self.estimator.label} tracks {describe_tracked(model, params)}")
        curvature = getattr(self.estimator, "curvature", None)
        if (
            curvature in ("kfac", "ekfac")
            and run is self.runs[0]
            and any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
        ):
            rank_zero_info(
                f"{curvature.upper()} on a model with attention ranks examples well below the exact GGN (on a small "
                "transformer classifier, 0.26-0.67 of its Spearman against retraining: docs/benchmarks/attention_ekfac.md); "
                "Influence('ggn') is the faithful choice where its cost allows."
            )
        return model, hooks, params, subset

    def attribute_run(
        self, run: Trajectory, query_data: Dataset, reduce: Literal["mean"] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Effects ``[queries, train]``, base measurements ``[queries]`` and what the estimator chose
        for this run (e.g. ``{"damping": ...}``; ``"parameters"``: the names of those tracked, when the
        estimator leaves some trainable ones out), for one run; with ``reduce="mean"``, of the mean
        measurement over the queries (``[1, train]`` and ``[1]``)."""
        with self._resolved(1 if reduce == "mean" else len(query_data), query_data):  # type: ignore[arg-type]
            return self._attribute_run(run, query_data, reduce)

    @contextlib.contextmanager
    def _resolved(self, num_columns: int | None, query_data: Dataset | None) -> Iterator[str | None]:
        """Run the estimator that its ``"auto"`` settings choose for ``num_columns`` query columns of
        ``query_data`` (``None``: self-influence) for the duration of one call, and yield why (``None``: nothing to
        choose), once the hooks are checked (``_check_hooks``); torch's batching-rule performance warnings are
        silenced meanwhile."""
        checked = [self._check_hooks(query_data)]
        requested = self.estimator

        def num_params() -> int:
            return sum(p.numel() for p in trainable_parameters(checked[0]).values())

        chosen, reason = requested.resolve(self.runs, num_params, num_columns)
        checked.clear()  # the model is not held (on the device) through the whole attribution
        if reason is not None:
            rank_zero_info(f"{type(requested).__name__}(curvature='auto') uses {chosen.label}: {reason}.")
        self.estimator = chosen
        try:
            with quiet_batching_rules():
                yield reason
        finally:
            self.estimator = requested

    def _attribute_run(
        self, run: Trajectory, query_data: Dataset, reduce: Literal["mean"] | None
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        model, hooks, params, subset = self._prepare(run, query_data)
        query_grads = measurement_gradients(
            model, query_data, self.batch_size, self.device, self.progress, reduce, params
        )
        with torch.no_grad():
            measurements = torch.cat(
                [
                    hooks.measurement(move_data_to_device(b, self.device))
                    for b in DataLoader(query_data, batch_size=self.batch_size)
                ]
            ).cpu()
        if reduce == "mean":
            measurements = measurements.mean(0, keepdim=True)
        context = RunContext(
            run,
            self.module,
            model,
            query_grads,
            query_data,
            self.train_data,
            self.batch_size,
            self.device,
            self.progress,
            self.cache_dir,
            params,
            reduce,
        )
        effects, info = self.estimator.estimate(context)
        if subset:
            info = {**info, "parameters": params}
        self._check_finite(run, effects)
        return effects.cpu(), measurements, info

    def _check_finite(self, run: Trajectory, effects: Tensor) -> None:
        bad = (~torch.isfinite(effects.reshape(-1, effects.shape[-1]))).any(dim=0).nonzero().flatten()
        if len(bad):
            raise FloatingPointError(
                f"{self.estimator.label} gave non-finite effects on run {run.name} for training examples "
                f"{bad.tolist()[:20]}{' ...' if len(bad) > 20 else ''} ({len(bad)} in all); check those examples, and the "
                "run's final weights and learning rates."
            )

    def cache_path(self, run: Trajectory, query_fingerprint: str, reduce: Literal["mean"] | None = None) -> Path:
        """Where ``run``'s effects are cached: named by a hash of everything they depend on."""
        assert self.cache_dir is not None
        estimator = self.estimator
        return effects_file(
            self.cache_dir,
            run,
            estimator.label,
            estimator.settings(),
            estimator.snapshots_used(run),
            query_fingerprint,
            reduce,
        )

    def _cached_attribute_run(
        self, run: Trajectory, query_data: Dataset, query_fingerprint: str, reduce: Literal["mean"] | None
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if self.cache_dir is None:
            return self.attribute_run(run, query_data, reduce)
        path = self.cache_path(run, query_fingerprint, reduce)
        if path.is_file():
            cached = load_tree(path)
            return cached["effects"], cached["measurements"], cached["info"]
        effects, measurements, info = self.attribute_run(run, query_data, reduce)
        if rank_and_world()[0] == 0:
            save_tree({"effects": effects, "measurements": measurements, "info": info}, path)
        return effects, measurements, info

    def attribute(
        self,
        query_data: Dataset,
        loggers: Logger | Sequence[Logger] | pl.Trainer | None = None,
        top_k: int = 5,
        reduce: Literal["mean"] | None = None,
    ) -> AttributionResult:
        """Attribute every query to every training example, in every run.

        Args:
            query_data: Query examples, batched like the training data; the measurement hook is
                evaluated on them.
            loggers: Lightning loggers (or a Trainer, whose loggers are used) that receive a table of
                each query's ``top_k`` examples whose removal raises and lowers its measurement most and a histogram of the effects.
            top_k: Rows per query and kind in the logged table.
            reduce: ``"mean"``: attribute the mean measurement over ``query_data`` (for example the
                validation loss) as one query: ``effects [seeds, 1, train]`` equal the mean over queries
                of the per-query effects, and ``measurements [seeds, 1]`` the mean measurements, so the
                distributional statistics are those of the mean. The query gradients are averaged before
                the solve, so memory does not grow with the number of queries. (K-FAC/EK-FAC "auto"
                damping is then fitted on the mean gradient.)

        Returns:
            An ``AttributionResult`` with ``effects [seeds, queries, train]``; its ``settings``
            hold the estimator's settings, what it chose per run, each run's seed, attributed step
            (``snapshot_steps``; ``snapshot``: which was asked for), status and training ``precision`` (and
            ``reduce``, when given).
        """
        if isinstance(query_data, (tuple, list)) and query_data and all(isinstance(t, Tensor) for t in query_data):
            # Read as a list of examples, two tensors are two "examples" that collate into a shape error.
            raise TypeError(
                f"query_data is a {type(query_data).__name__} of tensors; pass a Dataset, such as "
                "TensorDataset(inputs, targets), batched like the training data."
            )
        if len(query_data) == 0:  # type: ignore[arg-type]
            raise ValueError("query_data is empty; pass at least one query example.")
        if reduce not in (None, "mean"):
            raise ValueError(
                f"reduce must be None (one effect per query) or 'mean' (of the mean measurement), got {reduce!r}."
            )
        effects, measurements, per_run = [], [], []
        query_fingerprint = fingerprint_dataset(query_data) if self.cache_dir is not None else ""
        query_data = SeededDataset(query_data, self.runs[0].manifest.input_dtype)  # cast as the run's inputs were
        with self._resolved(1 if reduce == "mean" else len(query_data), query_data) as reason:  # type: ignore[arg-type]
            for run in tqdm(self.runs, desc=f"attributing ({self.estimator.label})", disable=not self.progress):
                e, m, info = self._cached_attribute_run(run, query_data, query_fingerprint, reduce)
                effects.append(e)
                measurements.append(m)
                per_run.append(info)
            settings = self._settings(per_run, reason)
        if reduce is not None:
            settings["reduce"] = reduce
        result = AttributionResult(
            torch.stack(effects), torch.stack(measurements), [run.name for run in self.runs], settings
        )
        # The query loss, of a loss function the library picked (cross-entropy, MSE, BCE: never negative).
        hooks = Hooks(self.module)  # type: ignore[arg-type]  # a class answers which hooks it defines too
        if hooks.default_measurement and hooks.default_loss_function:
            _warn_negative_losses(result, self.estimator.label)
        if rank_and_world()[0] == 0:
            log_result(result, _as_loggers(loggers), k=top_k)
        return result

    def _settings(self, per_run: list[dict[str, Any]], reason: str | None) -> dict[str, Any]:
        return {
            **self.estimator.settings(),
            **({} if reason is None else {"curvature_reason": reason}),
            "per_run": per_run,
            "seeds": [run.seed for run in self.runs],
            "snapshot": self.snapshot,
            "snapshot_steps": [run.final_step for run in self.runs],
            "run_status": [run.status for run in self.runs],
            # A mixed-precision run is attributed in full precision: its settings should say what it trained in.
            "precision": [run.manifest.precision for run in self.runs],
            "module": self.runs[0].module_class,
            "dataset_fingerprint": self.runs[0].dataset_fingerprint,
            "versions": self.runs[0].manifest.versions,
        }

    def self_influence(self) -> SelfInfluence:
        """Each training example's removal effect on its own training loss, in every run, without the
        ``[N, N]`` matrix of ``attribute`` on the training set (whose diagonal it equals with the
        default measurement, the loss).

        Sign as everywhere: the predicted change of the example's loss when it is removed; for influence
        functions ``g_n^T (C + lambda I)^-1 g_n / N >= 0``. Computed per run in chunks of ``batch_size``
        training gradients (each solved by the curvature and dotted with itself), sharded over ranks like
        ``attribute``; the fitted curvature is cached in ``cache_dir``, the values are not.

        Returns:
            A ``SelfInfluence`` with ``effects [seeds, train]`` and the base ``losses [seeds, train]``.

        On randomly augmented runs each example is read in one fixed view (see ``Attributor``), and a warning
        says that an unlucky view ranks high.

        Raises:
            ValueError: For an estimator that cannot give it without one estimate per example
                (``Unrolled``, ``Segmented``) or the exact GGN solved by Krylov methods; the
                message says what to use instead.
        """
        if any(run.manifest.augmentation is not None for run in self.runs):
            rank_zero_warn(
                "self_influence: the runs trained on randomly augmented data, and it reads each example in one fixed "
                "view: an example whose view is an unlucky one (shifted off the frame, cropped away) ranks high for "
                "its view, not for the example. Compare SelfInfluence.losses with the examples' losses without "
                "augmentation before removing any."
            )
        with self._resolved(None, None) as reason:
            return self._self_influence(reason)

    def _self_influence(self, reason: str | None) -> SelfInfluence:
        effects, losses, per_run = [], [], []
        for run in tqdm(self.runs, desc=f"self-influence ({self.estimator.label})", disable=not self.progress):
            model, hooks, params, subset = self._prepare(run, None)
            named = trainable_parameters(model)
            no_queries = torch.empty(
                0, sum(named[name].numel() for name in params), dtype=named[params[0]].dtype, device=self.device
            )
            context = RunContext(
                run,
                self.module,
                model,
                no_queries,
                Subset(self.train_data, []),
                self.train_data,
                self.batch_size,
                self.device,
                self.progress,
                self.cache_dir,
                params,
            )
            values, info = self.estimator.self_influence(context)
            if subset:
                info = {**info, "parameters": params}
            self._check_finite(run, values)
            with torch.no_grad():
                loss = torch.cat(
                    [
                        hooks.train_loss(move_data_to_device(b, self.device))
                        for b in DataLoader(self.train_data, batch_size=self.batch_size)
                    ]
                )
            effects.append(values.cpu())
            losses.append(loss.cpu())
            per_run.append(info)
        return SelfInfluence(
            torch.stack(effects), torch.stack(losses), [run.name for run in self.runs], self._settings(per_run, reason)
        )


def _warn_negative_losses(result: AttributionResult, label: str) -> None:
    """Say when removals are predicted to take a (non-negative) query loss below zero: effects that large are
    beyond what a first-order prediction of the run holds, which nothing else would show."""
    if bool((result.measurements < 0).any()):  # a loss function of the user's that can be negative
        return
    after = result.measurements[:, :, None] + result.effects
    # A small overshoot of a query fitted to near zero loss is ordinary first-order error; a tenth of the
    # typical loss below zero is not.
    typical = result.measurements.mean().item()
    negative = int((after < -0.1 * typical).sum())
    if negative:
        rank_zero_warn(
            f"{label}: {negative} of {after.numel()} predicted query losses after a removal are below zero by more "
            f"than a tenth of the mean query loss, {typical:.3g} (lowest {after.min().item():.3g}), which a loss "
            "cannot be: those effects are beyond what a first-order "
            "prediction of the run holds (an approximate curvature far off in scale, a run whose path bends at ReLU "
            "or max-pool kinks). Their ranking may still serve; their size does not. Compare estimators on "
            "evaluation.retrain's ground truth for a few examples."
        )
