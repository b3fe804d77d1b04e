"""``AttributionCallback``: attribute at the end of ``fit`` and log the results where the run logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, Subset
from typing_extensions import override

from lightning_dtda.influence import Attributor
from lightning_dtda.recorder import TrajectoryRecorder
from lightning_dtda.reporting import log_result
from lightning_dtda.result import AttributionResult
from lightning_dtda.trajectory import load_runs


class AttributionCallback(Callback):
    """Run the :class:`~lightning_dtda.Attributor` when ``fit`` ends and log the result to the trainer's loggers.

    It attributes the queries over every run recorded so far in the :class:`TrajectoryRecorder`'s
    ``dirpath`` (so after the last of several seeds it reports the distribution over all of them),
    logs summary scalars, a top-k table and a histogram to every logger (see ``log_result``), and
    saves the result as ``attribution.pt`` (with ``attribution.json``) in the recorder's ``dirpath``.
    Only rank zero attributes under multi-process training.

    Args:
        query_data: The query examples. Default: the first ``num_queries`` examples of the validation
            dataloader's dataset (so the callback can be configured from a LightningCLI file).
        num_queries: How many validation examples to take when ``query_data`` is not given.
        curvature: As for the Attributor: ``"ekfac"``, ``"kfac"``, ``"ggn"``, ``"identity"``.
        method: ``"influence"``, ``"unrolled"`` or ``"segmented"``.
        damping: ``"auto"`` or a positive float.
        top_k: Rows per query and kind in the logged table.
        every_n_epochs: Also attribute at the end of every this many epochs, on the snapshots
            recorded so far (the running run's latest snapshot stands in for its final weights);
            logged at the trainer's global step.
        progress: Show the Attributor's progress bars.

    Raises:
        RuntimeError: At the end of fit, if the trainer has no ``TrajectoryRecorder``, or no query
            data was given and there is no validation dataloader to take it from.

    Example::

        trainer = Trainer(callbacks=[TrajectoryRecorder("runs/"), AttributionCallback(query_set)],
                          logger=TensorBoardLogger("logs/"))
        trainer.fit(model, train_loader)   # the influential examples are in TensorBoard
    """

    def __init__(
        self,
        query_data: Dataset | None = None,
        num_queries: int = 5,
        curvature: str = "ekfac",
        method: str = "influence",
        damping: float | str = "auto",
        top_k: int = 5,
        every_n_epochs: int | None = None,
        progress: bool = True,
    ) -> None:
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive integer or None, got {every_n_epochs!r}.")
        self.every_n_epochs = every_n_epochs
        self.query_data = query_data
        self.num_queries = num_queries
        self.settings: dict[str, Any] = dict(curvature=curvature, method=method, damping=damping, progress=progress)
        self.top_k = top_k
        self.result: AttributionResult | None = None

    def _queries(self, trainer: pl.Trainer) -> Dataset:
        if self.query_data is not None:
            return self.query_data
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise RuntimeError(
                "AttributionCallback has no query_data and the trainer no validation dataloader to take "
                "queries from; pass query_data=..."
            )
        dataset = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
        return Subset(dataset, range(min(self.num_queries, len(dataset))))

    def _attribute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int | None) -> None:
        recorder = next((c for c in trainer.callbacks if isinstance(c, TrajectoryRecorder)), None)  # type: ignore[attr-defined]
        if recorder is None:
            raise RuntimeError("AttributionCallback needs a TrajectoryRecorder among the trainer's callbacks.")
        if not trainer.is_global_zero:
            return
        recorder.write_manifest()
        runs = load_runs(recorder.dirpath)
        rank_zero_info(f"AttributionCallback: attributing {len(runs)} run(s) in {recorder.dirpath}")
        attributor = Attributor(pl_module, runs, trainer.train_dataloader.dataset, device=pl_module.device, **self.settings)
        self.result = attributor.attribute(self._queries(trainer))  # on a copy of the module
        log_result(self.result, trainer.loggers, k=self.top_k, step=step)
        self.result.save(Path(recorder.dirpath) / "attribution.pt")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._attribute(trainer, pl_module, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attribute(trainer, pl_module, step=None)
