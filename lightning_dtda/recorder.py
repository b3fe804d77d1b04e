"""``TrajectoryRecorder``: a Lightning callback that records what attribution needs from a run."""

from __future__ import annotations

import importlib.metadata
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler, SequentialSampler
from typing_extensions import override

from lightning_dtda._io import load_json, save_archive, save_json
from lightning_dtda.data import fingerprint_dataset
from lightning_dtda.trajectory import MANIFEST, SNAPSHOT_FORMAT, jsonable


class _RecordingSampler(Sampler[int]):
    """Passes a sampler's indices through unchanged and remembers those of the current pass.

    The sampler runs in the main process even when the DataLoader has workers, and batches reach
    ``training_step`` in sampler order, so the k-th batch of a pass holds the k-th chunk of
    ``batch_size`` indices drawn in that pass, however far the loader has prefetched.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.drawn: list[int] = []
        self.passes = 0

    def __iter__(self) -> Iterator[int]:
        self.drawn = []
        self.passes += 1
        # Chunks, not one index at a time: a Python step per index cost the recorder 2% of training.
        indices = iter(self.sampler)
        while chunk := list(itertools.islice(indices, 256)):
            self.drawn.extend(chunk)
            yield from chunk

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def recover_first_pass(self) -> None:
        """Recover the indices of a pass that began before this wrapper was installed.

        Under multi-process training the loader is wrapped only at ``on_train_start``, after
        Lightning created its first iterator (which, with workers, already drew indices). A
        ``DistributedSampler`` yields the same indices whenever it is iterated within an epoch, so they
        can be drawn again here; any other sampler cannot be replayed.
        """
        if not isinstance(self.sampler, (DistributedSampler, SequentialSampler)):
            raise RuntimeError(
                f"The first epoch's indices were drawn from a {type(self.sampler).__name__} before "
                "TrajectoryRecorder could attach; use num_workers=0 or a DistributedSampler."
            )
        self.drawn = list(self.sampler)
        self.passes = 1

    def __getattr__(self, name: str) -> Any:
        # ``set_epoch`` and friends of the wrapped sampler stay reachable.
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def _package_version() -> str:
    try:
        return importlib.metadata.version("lightning-dtda")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class TrajectoryRecorder(Callback):
    r"""Record the weights, learning rates and batch membership of a training run.

    Attribution by influence functions needs the final weights; unrolled differentiation needs the
    whole path. This callback keeps both, in one folder per run under ``dirpath``:

    - ``manifest.json``: package versions, the LightningModule's class path and hyperparameters,
      the seed, the training set's length and fingerprint, the optimizer's class and per-group
      settings, the schedulers, batch size, steps per epoch, gradient accumulation, world size, and
      the list of snapshots with their SHA-256 checksums (brought up to date whenever a checkpoint
      is saved and at the end of training, when it is marked complete);
    - ``snapshots/step_XXXXXXXX.snapshot`` (a JSON header and raw tensor bytes; read it with
      ``Trajectory.snapshot``): the module's ``state_dict`` at step 0, every
      ``every_n_train_steps`` optimizer steps or ``every_n_epochs`` epochs, and at the end, with the
      learning rate of every parameter group; each snapshot also holds, for every optimizer step
      since the previous snapshot, the dataset indices of each micro-batch (in the order they were
      in the batch) and the learning rates that step used.

    Batch membership is read from the train DataLoader's sampler: any ``DataLoader`` built with
    ``batch_size`` (``shuffle=True`` or a custom ``sampler``) works unchanged, with or without
    workers. Under multi-process strategies (DDP) each optimizer step records every rank's
    micro-batch, gathered in rank order, and only rank zero writes files. Every file is written to a temporary name and renamed, so a killed run leaves no
    half-written file. The callback's ``state_dict`` (saved in Lightning checkpoints) holds the run
    folder and the steps since the last snapshot, so ``trainer.fit(ckpt_path=...)`` continues the
    same run; snapshots written after that checkpoint are discarded as belonging to the abandoned
    continuation.

    Args:
        dirpath: Folder of runs (an ensemble). Each run writes into ``dirpath / run_name``.
        run_name: Name of this run's folder. Defaults to ``seed_{seed}``, or ``run_{k}`` (the first
            free ``k``) when no seed is known.
        every_n_train_steps: Snapshot every this many optimizer steps.
        every_n_epochs: Snapshot at the end of every this many epochs. Defaults to 1 when neither
            interval is given; at most one of the two may be set.
        save_optimizer_state: Also store the optimizer's ``state_dict`` in each snapshot.
        seed: The run's seed. Defaults to the one set by ``lightning.seed_everything``.

    Raises:
        ValueError: If both intervals are set, or an interval is not a positive integer.
        RuntimeError: At fit start, if the run folder already holds a recorded run, if the train
            DataLoader has no ``BatchSampler`` to record from, or if there are several optimizers.

    Example::

        from lightning import Trainer, seed_everything
        from lightning_dtda import TrajectoryRecorder

        for seed in range(4):
            seed_everything(seed)
            trainer = Trainer(max_epochs=10, callbacks=[TrajectoryRecorder("runs/")])
            trainer.fit(MyModule(), train_loader)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        run_name: str | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_optimizer_state: bool = False,
        seed: int | None = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValueError(
                "TrajectoryRecorder takes every_n_train_steps or every_n_epochs, not both "
                f"(got {every_n_train_steps} and {every_n_epochs})."
            )
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.dirpath = Path(dirpath)
        self.run_name = run_name
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.save_optimizer_state = save_optimizer_state
        self.seed = seed

        self.run_dir: Path | None = None
        # Steps since the last snapshot: per step, its micro-batches' indices and its learning rates.
        self._steps: list[dict[str, Any]] = []
        self._last_snapshot_step = -1
        self._resuming = False
        self._sampler: _RecordingSampler | None = None
        self._restore_source: Any = None
        self._pass = 0
        self._position = 0
        self._micro_batches: list[list[int]] = []
        self._step_lrs: list[float] | None = None
        self._batch_size = 0
        self._manifest: dict[str, Any] | None = None
        self._snapshots: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ data: batch membership
    def _wrap_loader(self, loader: Any) -> Any:
        if not isinstance(loader, DataLoader):
            raise RuntimeError(
                "TrajectoryRecorder needs a single torch DataLoader for training, got "
                f"{type(loader).__name__}. Pass one DataLoader (not a list or dict of them)."
            )
        batch_sampler = loader.batch_sampler
        if not isinstance(batch_sampler, BatchSampler) or type(batch_sampler).__iter__ is not BatchSampler.__iter__:
            raise RuntimeError(
                "TrajectoryRecorder reads batch membership from the train DataLoader's BatchSampler, but "
                f"this loader uses batch_sampler={type(batch_sampler).__name__}. Build the loader with "
                "`DataLoader(dataset, batch_size=..., shuffle=...)` or `sampler=...` (any sampler of "
                "dataset indices) instead of a custom batch_sampler."
            )
        inner = batch_sampler.sampler
        if isinstance(inner, _RecordingSampler):  # the same loader fitted again
            inner = inner.sampler
        self._sampler = _RecordingSampler(inner)
        batch_sampler.sampler = self._sampler
        self._batch_size = batch_sampler.batch_size
        return loader

    def _wrap_data_source(self, trainer: pl.Trainer) -> None:
        # The sampler must be wrapped before Lightning first iterates the loader, which happens before
        # ``on_train_start`` (and, with workers, draws indices at once). The only hook that early is
        # ``setup``, when the loader may not exist yet; so wrap the source that makes it. Lightning
        # keeps that source on the fit loop (an internal attribute, stable across 2.x).
        source = trainer.fit_loop._data_source
        instance = source.instance
        if isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
            make_loader = getattr(instance, source.name)

            def recorded_loader() -> Any:
                return self._wrap_loader(make_loader())

            setattr(instance, source.name, recorded_loader)
            self._restore_source = (instance, source.name)
        else:
            self._wrap_loader(instance)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size == 1:
            self._wrap_data_source(trainer)
        # Under multi-process training Lightning replaces the loader by one with a DistributedSampler
        # after the source made it; that loader is wrapped in on_train_start.

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._restore_source is not None:
            instance, name = self._restore_source
            delattr(instance, name)
            self._restore_source = None

    # ------------------------------------------------------------------ run folder and manifest
    def _choose_run_dir(self, seed: int | None) -> Path:
        if self.run_name is not None:
            name = self.run_name
        elif seed is not None:
            name = f"seed_{seed}"
        else:
            k = 0
            while (self.dirpath / f"run_{k}").exists():
                k += 1
            name = f"run_{k}"
        run_dir = self.dirpath / name
        if (run_dir / MANIFEST).exists():
            raise RuntimeError(
                f"{run_dir} already holds a recorded run. Give this run another `run_name` or "
                "`dirpath`, delete the folder, or resume it with `trainer.fit(ckpt_path=...)`."
            )
        return run_dir

    def _describe_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seed: int | None) -> dict[str, Any]:
        loader = trainer.train_dataloader
        optimizer = trainer.optimizers[0]
        cls = type(pl_module)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        return {
            "format": SNAPSHOT_FORMAT,
            "versions": {
                "lightning_dtda": _package_version(),
                "lightning": pl.__version__,
                "torch": torch.__version__,
            },
            "module": {"class": f"{cls.__module__}.{cls.__qualname__}", "hparams": jsonable(dict(pl_module.hparams))},
            "seed": seed,
            "dataset": {"length": len(loader.dataset), "fingerprint": fingerprint_dataset(loader.dataset)},
            "optimizer": {
                "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                "param_groups": [
                    jsonable({**{k: v for k, v in g.items() if k != "params"}, "param_names": [names[id(p)] for p in g["params"]]})
                    for g in optimizer.param_groups
                ],
            },
            "schedulers": [
                {
                    "class": f"{type(c.scheduler).__module__}.{type(c.scheduler).__qualname__}",
                    "interval": c.interval,
                    "frequency": c.frequency,
                    "cycle_momentum": bool(getattr(c.scheduler, "cycle_momentum", False)),
                }
                for c in trainer.lr_scheduler_configs
            ],
            "batch_size": self._batch_size,
            "drop_last": loader.drop_last,
            "batches_per_epoch": trainer.num_training_batches,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "snapshots": [],
            "complete": False,
        }

    # ------------------------------------------------------------------ training hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"TrajectoryRecorder supports one optimizer, found {len(trainer.optimizers)}.")
        if trainer.world_size > 1:
            self._wrap_loader(trainer.train_dataloader)
        if self._sampler is None or trainer.train_dataloader.batch_sampler.sampler is not self._sampler:
            raise RuntimeError(
                "TrajectoryRecorder could not attach to the train DataLoader before training began; "
                "return a torch DataLoader from `train_dataloader()` or pass one to `trainer.fit`."
            )
        self._pass = self._sampler.passes
        self._position = 0
        self._micro_batches = []
        if self._resuming:
            self._resume(trainer)
            return
        seed = self.seed
        if seed is None and "PL_GLOBAL_SEED" in os.environ:
            seed = int(os.environ["PL_GLOBAL_SEED"])
        manifest = self._describe_run(trainer, pl_module, seed)
        self.run_dir = self._choose_run_dir(seed)
        trainer.strategy.barrier()  # every rank has chosen the folder before rank zero fills it
        self._manifest = manifest
        self._snapshots = []
        if trainer.is_global_zero:
            save_json(manifest, self.run_dir / MANIFEST)
        self._steps = []
        self._snapshot(trainer, pl_module)
        rank_zero_info(f"TrajectoryRecorder: recording to {self.run_dir}")

    def _resume(self, trainer: pl.Trainer) -> None:
        assert self.run_dir is not None
        expected = self._last_snapshot_step + len(self._steps)
        if expected != trainer.global_step:
            raise RuntimeError(
                f"The checkpoint's TrajectoryRecorder state ends at step {expected}, but training resumes at "
                f"step {trainer.global_step}; the checkpoint was not written by this recorder's run."
            )
        manifest = load_json(self.run_dir / MANIFEST)
        manifest["snapshots"] = self._snapshots
        manifest["complete"] = False
        self._manifest = manifest
        if trainer.is_global_zero:
            save_json(manifest, self.run_dir / MANIFEST)
            # Snapshots written after the checkpoint belong to the abandoned continuation.
            kept = {entry["file"] for entry in self._snapshots}
            for path in (self.run_dir / "snapshots").glob("step_*.snapshot"):
                if f"snapshots/{path.name}" not in kept:
                    path.unlink()
        self._resuming = False
        rank_zero_info(f"TrajectoryRecorder: resuming {self.run_dir} at step {trainer.global_step}")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self._sampler is not None
        if self._sampler.passes == 0:
            self._sampler.recover_first_pass()
        if self._sampler.passes != self._pass:  # the loader began a new pass (a new epoch)
            self._pass = self._sampler.passes
            self._position = 0
        # Schedulers step after the optimizer step, so the rate read before any micro-batch of a step
        # is the one that step uses.
        self._step_lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
        start = self._position * self._batch_size
        indices = self._sampler.drawn[start : start + self._batch_size]
        if self._position == 0:  # once per pass: the batches hold what the sampler drew
            self._check_batch_size(batch, batch_idx, len(indices))
        self._position += 1
        if trainer.world_size > 1:
            # Every rank's micro-batch of this step, in rank order (ranks draw equal-sized batches).
            gathered = trainer.strategy.all_gather(torch.tensor([int(i) for i in indices], device=pl_module.device))
            self._micro_batches.extend(gathered.reshape(trainer.world_size, -1).tolist())
        else:
            self._micro_batches.append(indices)

    @staticmethod
    def _check_batch_size(batch: Any, batch_idx: int, drawn: int) -> None:
        try:
            size = extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot size: trust the sampler
            return
        if size != drawn:
            raise RuntimeError(
                f"Batch {batch_idx} has {size} examples but its sampler drew {drawn} indices; a "
                "collate_fn that adds or drops examples breaks batch membership."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._last_snapshot_step + len(self._steps)
        if trainer.global_step == step:  # accumulating: no optimizer step yet
            return
        if trainer.global_step != step + 1 or self._step_lrs is None:
            raise RuntimeError(f"TrajectoryRecorder lost track of optimizer steps at step {trainer.global_step}.")
        self._steps.append({"micro_batches": self._micro_batches, "lrs": self._step_lrs})
        self._micro_batches = []
        self._step_lrs = None
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._snapshot(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._snapshot(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._snapshot(trainer, pl_module)
        self._write_manifest(complete=True)

    def write_manifest(self) -> None:
        """Bring the run's manifest up to date with the snapshots taken so far (rank zero), so the
        run can be read while it trains (``AttributionCallback(every_n_epochs=...)`` does)."""
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        if self._manifest is None or self.run_dir is None or rank_zero_only.rank != 0:
            return
        self._manifest["snapshots"] = self._snapshots
        self._manifest["complete"] = complete
        save_json(self._manifest, self.run_dir / MANIFEST)

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_snapshot_step:
            return
        if trainer.is_global_zero:
            assert self.run_dir is not None
            optimizer = trainer.optimizers[0]
            micro = [m for s in self._steps for m in s["micro_batches"]]
            payload: dict[str, Any] = {
                "format": SNAPSHOT_FORMAT,
                "step": step,
                "epoch": trainer.current_epoch,
                "state_dict": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                "lrs": [float(g["lr"]) for g in optimizer.param_groups],
                "steps": {
                    "first": self._last_snapshot_step + 1,
                    "indices": torch.tensor(list(itertools.chain.from_iterable(micro)), dtype=torch.long),
                    "micro_batch_sizes": torch.tensor([len(m) for m in micro], dtype=torch.long),
                    "micro_batches_per_step": torch.tensor([len(s["micro_batches"]) for s in self._steps], dtype=torch.long),
                    "lrs": torch.tensor([s["lrs"] for s in self._steps], dtype=torch.float64).reshape(
                        len(self._steps), len(optimizer.param_groups)
                    ),
                },
            }
            if self.save_optimizer_state:
                payload["optimizer_state"] = optimizer.state_dict()
            name = f"snapshots/step_{step:08d}.snapshot"
            sha256 = save_archive(payload, self.run_dir / name)
            # The manifest is rewritten at checkpoints and at the end rather than here: one file write
            # per snapshot instead of two (file writes are a large share of the recorder's cost).
            self._snapshots.append({"file": name, "step": step, "epoch": trainer.current_epoch, "sha256": sha256})
        self._steps = []
        self._last_snapshot_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        # A checkpoint is being written: bring the manifest up to date with it (rank zero writes).
        self._write_manifest(complete=False)
        return {
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "last_snapshot_step": self._last_snapshot_step,
            "steps": self._steps,
            "snapshots": self._snapshots,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("run_dir") is None:
            return
        self.run_dir = Path(state_dict["run_dir"])
        self._last_snapshot_step = state_dict["last_snapshot_step"]
        self._steps = state_dict["steps"]
        self._snapshots = state_dict["snapshots"]
        self._resuming = True
