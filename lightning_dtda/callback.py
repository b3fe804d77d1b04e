"""``AttributionCallback``: attribute at the end of ``fit`` and log the results where the run logs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import Dataset, Subset
from typing_extensions import override

from lightning_dtda.attributor import Attributor
from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.estimators import Estimator, Influence, Segmented, Unrolled
from lightning_dtda.record.recorder import TrajectoryRecorder, unreplayable_callbacks, weight_averaging
from lightning_dtda.reporting.loggers import log_result
from lightning_dtda.results.result import AttributionResult
from lightning_dtda.runs.format import optimizer_name
from lightning_dtda.runs.replayable import replay_advice, unreplayable_layers
from lightning_dtda.runs.trajectory import Trajectory, find_runs


class AttributionCallback(Callback):
    """Run the ``Attributor`` when ``fit`` ends and log the result to the trainer's loggers.

    It attributes the queries over every finished run in the ``TrajectoryRecorder``'s ``dirpath``
    and the run being trained (so after the last of several seeds it reports the distribution over
    all of them), logs summary scalars, a top-k table and a histogram to every logger at the
    trainer's global step (see ``log_result``), and saves the result as ``attribution.safetensors`` (with
    ``attribution.json``) in the recorder's ``dirpath``. Other runs in that folder that have not
    finished (in progress elsewhere, or abandoned) are left out with a warning that names them. Only
    rank zero attributes under multi-process training.

    Args:
        query_data: The query examples. Default: the first ``num_queries`` examples of the validation
            dataloader's dataset (so the callback can be configured from a LightningCLI file).
        num_queries: How many validation examples to take when ``query_data`` is not given.
        estimator: How to estimate effects: ``Influence()`` (default), ``Unrolled()``, ``Segmented()``, with
            their settings. In a LightningCLI file: ``estimator: {class_path: lightning_dtda.Segmented,
            init_args: {segments: 4}}``.
        top_k: Rows per query and kind in the logged table.
        every_n_epochs: Also attribute at the end of every this many epochs, with the running run's
            current weights standing in for its final ones (the recorder snapshots them then, if its own
            interval did not).
        batch_size: The Attributor's ``batch_size``.
        cache_dir: The Attributor's ``cache_dir``: finished runs' effects are then computed once, not
            again after every seed.
        progress: Show the Attributor's progress bars.

    Raises:
        ValueError: For an ``every_n_epochs`` that is not a positive integer.
        TypeError: For an ``estimator`` that is not an ``Estimator``.
        RuntimeError: At fit start, if the trainer has no ``TrajectoryRecorder``, or no query data was
            given and there is no validation dataloader to take it from.

    Example:

        ```python
        trainer = Trainer(callbacks=[TrajectoryRecorder("runs/"), AttributionCallback(query_set)],
                          logger=TensorBoardLogger("logs/"))
        trainer.fit(model, train_loader)   # the influential examples are in TensorBoard
        ```
    """

    def __init__(
        self,
        query_data: Dataset | None = None,
        num_queries: int = 5,
        estimator: Estimator = Influence(),
        top_k: int = 5,
        every_n_epochs: int | None = None,
        batch_size: int = 128,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive integer or None, got {every_n_epochs!r}.")
        if not isinstance(estimator, Estimator):
            raise TypeError(
                f"estimator must be an Estimator such as Influence(), Unrolled() or Segmented(), got {estimator!r}."
            )
        self.query_data = query_data
        self.num_queries = num_queries
        self.estimator = estimator
        self.top_k = top_k
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.progress = progress
        self.result: AttributionResult | None = None
        self._attributed_at: int | None = (
            None  # the global step of the last result, when its run's snapshot was current
        )

    def _recorder(self, trainer: pl.Trainer) -> TrajectoryRecorder:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        recorder = next((c for c in callbacks if isinstance(c, TrajectoryRecorder)), None)
        if recorder is None:
            raise RuntimeError("AttributionCallback needs a TrajectoryRecorder among the trainer's callbacks.")
        return recorder

    def _queries(self, trainer: pl.Trainer) -> Dataset:
        if self.query_data is not None:
            return self.query_data
        loaders = trainer.val_dataloaders
        if loaders is None:  # not loaded yet (no validation so far): ask the source that makes them
            loaders = trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
        dataset = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
        return Subset(dataset, range(min(self.num_queries, len(dataset))))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._recorder(trainer)
        if self.query_data is None and not _has_val_data(trainer):
            raise RuntimeError(
                "AttributionCallback has no query_data and the trainer no validation dataloader to take "
                "queries from; pass query_data=..."
            )
        self._attributed_at = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A replaying estimator would meet this only after training: refuse it before any.
        optimizer = optimizer_name(trainer.optimizers[0]) if trainer.optimizers else None
        replays = isinstance(self.estimator, Unrolled) or (isinstance(self.estimator, Segmented) and optimizer != "SGD")
        averaging = weight_averaging(trainer.callbacks)  # type: ignore[attr-defined]
        if averaging:
            raise UnsupportedTrainingError(
                f"AttributionCallback cannot attribute a run trained with {', '.join(averaging)}: fit leaves an average "
                "of the weights training passed through, which the snapshots do not hold."
            )
        problems = unreplayable_layers(pl_module) if replays else []
        if replays:
            problems += [f"{name} changes its training" for name in unreplayable_callbacks(trainer.callbacks)]  # type: ignore[attr-defined]
        if problems:
            raise UnsupportedTrainingError(
                f"AttributionCallback's {type(self.estimator).__name__} replays the run, and no replay can reproduce "
                f"this module's training: {'; '.join(problems)}. {replay_advice(optimizer)}"
            )

    def _runs(self, recorder: TrajectoryRecorder) -> list[Trajectory]:
        recorder.write_manifest()
        runs = find_runs(recorder.dirpath)
        selected = [run for run in runs if run.status == "finished" or run.path == recorder.run_dir]
        skipped = [run for run in runs if run not in selected]
        if skipped:
            rank_zero_warn(
                "AttributionCallback leaves out runs that have not finished:\n"
                + "\n".join(f"  - {run.describe_status()}" for run in skipped)
            )
        return selected

    def _attribute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self._recorder(trainer)
        if not trainer.is_global_zero:
            return
        runs = self._runs(recorder)
        rank_zero_info(f"AttributionCallback: attributing {len(runs)} run(s) in {recorder.dirpath}")
        attributor = Attributor(
            pl_module,
            runs,
            trainer.train_dataloader.dataset,
            self.estimator,
            self.batch_size,
            pl_module.device,
            self.progress,
            self.cache_dir,
        )
        self.result = attributor.attribute(self._queries(trainer))  # on a copy of the module
        log_result(self.result, trainer.loggers, k=self.top_k, step=trainer.global_step)
        path = Path(recorder.dirpath) / "attribution.safetensors"
        self.result.save(path)
        # Without a logger nothing shows where the result went.
        rank_zero_info(
            f"AttributionCallback: saved to {path}{'' if trainer.loggers else ' (the trainer has no logger)'}"
        )
        current = recorder.writer.last_snapshot_step == trainer.global_step
        self._attributed_at = trainer.global_step if current else None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            # Attribute the weights of now: the recorder snapshots them if it has not (taking a snapshot
            # is idempotent, so whichever of the two callbacks Lightning calls first, there is one).
            self._recorder(trainer).writer.snapshot(trainer, pl_module)
            self._attribute(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._attributed_at != trainer.global_step:
            self._attribute(trainer, pl_module)
        elif trainer.is_global_zero and self.result is not None:
            # The last epoch's result already used the final weights; only the run's status changed.
            recorder = self._recorder(trainer)
            recorder.write_manifest()
            status = {run.name: run.status for run in find_runs(recorder.dirpath)}
            self.result.settings["run_status"] = [status[name] for name in self.result.runs]
            self.result.save(Path(recorder.dirpath) / "attribution.safetensors")


def _has_val_data(trainer: pl.Trainer) -> bool:
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    instance = source.instance
    if isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
        return is_overridden(source.name, instance) or source.name in vars(instance)
    return instance is not None
