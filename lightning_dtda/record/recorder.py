"""``TrajectoryRecorder``: a Lightning callback that records what attribution needs from a run.

It wires two parts to Lightning's hooks: ``BatchMembership`` (which
examples each step trained on) and ``RunWriter`` (the run's files).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    EarlyStopping,
    GradientAccumulationScheduler,
    ModelPruning,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_dtda._version import __version__
from lightning_dtda.hooks import Hooks
from lightning_dtda.record.membership import BatchMembership
from lightning_dtda.record.writer import RunWriter
from lightning_dtda.runs.augmentation import ReplayableAugmentation
from lightning_dtda.runs.fingerprint import changes_between_reads, draws_random_numbers, fingerprint_dataset
from lightning_dtda.runs.format import (
    Manifest,
    RecordingProcess,
    jsonable,
    module_fingerprint,
    optimizer_name,
    scheduled_settings,
)
from lightning_dtda.runs.replayable import unreplayable_layers


def _package_version() -> str:
    # The version of the code that runs, not of the installed distribution's metadata, which an
    # editable install or a PYTHONPATH checkout can leave behind.
    return __version__


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def early_stopping(callbacks: list[Any]) -> tuple[str, ...]:
    """The ``EarlyStopping`` callbacks among ``callbacks``, as the manifest records them."""
    return tuple(
        f"EarlyStopping(monitor={c.monitor!r}, patience={c.patience}, min_delta={abs(c.min_delta):g}, mode={c.mode!r})"
        for c in callbacks
        if isinstance(c, EarlyStopping)
    )


def _names(callbacks: list[Any], kinds: tuple[type, ...]) -> tuple[str, ...]:
    return tuple(sorted({type(c).__name__ for c in callbacks if isinstance(c, kinds)}))


def weight_averaging(callbacks: list[Any]) -> tuple[str, ...]:
    """The class names of the weight-averaging callbacks among ``callbacks``, as the manifest records them."""
    return _names(callbacks, (StochasticWeightAveraging, WeightAveraging))


def unreplayable_callbacks(callbacks: list[Any]) -> tuple[str, ...]:
    """The class names of the callbacks among ``callbacks`` that change training where no replay follows."""
    return _names(callbacks, (GradientAccumulationScheduler, BaseFinetuning, ModelPruning))


def describe_run(trainer: pl.Trainer, pl_module: pl.LightningModule, seed: int | None, batch_size: int) -> Manifest:
    """The manifest of a run about to start (no snapshots yet)."""
    loader = trainer.train_dataloader
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in pl_module.named_parameters()}
    return Manifest(
        versions={"lightning_dtda": _package_version(), "lightning": pl.__version__, "torch": torch.__version__},
        module_class=_class_path(pl_module),
        hparams=jsonable(dict(pl_module.hparams)),
        module_fingerprint=module_fingerprint(pl_module),
        seed=seed,
        dataset_length=len(loader.dataset),
        dataset_fingerprint=fingerprint_dataset(loader.dataset),
        augmentation="replayable"
        if isinstance(loader.dataset, ReplayableAugmentation)
        else ("random" if draws_random_numbers(loader.dataset) else None),
        optimizer_class=_class_path(optimizer),
        param_groups=[
            jsonable(
                {**{k: v for k, v in g.items() if k != "params"}, "param_names": [names[id(p)] for p in g["params"]]}
            )
            for g in optimizer.param_groups
        ],
        schedulers=[
            {
                "class": _class_path(c.scheduler),
                "interval": c.interval,
                "frequency": c.frequency,
                "cycle_momentum": bool(getattr(c.scheduler, "cycle_momentum", False)),
            }
            for c in trainer.lr_scheduler_configs
        ],
        batch_size=batch_size,
        drop_last=loader.drop_last,
        batches_per_epoch=trainer.num_training_batches,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        world_size=trainer.world_size,
        precision=str(trainer.precision),
        max_epochs=trainer.max_epochs,
        max_steps=trainer.max_steps,
        gradient_clipping={
            "value": trainer.gradient_clip_val,
            "algorithm": str(
                getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
            ),
            "custom": is_overridden("configure_gradient_clipping", pl_module),
        },
        writer=RecordingProcess.this_process(),
        early_stopping=early_stopping(trainer.callbacks),
        weight_averaging=weight_averaging(trainer.callbacks),
        unreplayable_callbacks=unreplayable_callbacks(trainer.callbacks),
    )


_REPORT = "Please report this with your Trainer's settings; record the run again once it is fixed."
_MANUAL = (
    "The recorder supports manual optimization with one optimizer step per training_step; Lightning's automatic "
    "optimization records any accumulation."
)


def _warn_missing_hooks(pl_module: pl.LightningModule, batch: Any) -> None:
    """Say at the first batch, not after training, what attribution will need: a hook the module lacks
    for its batches or targets. The model is not run (a forward would move BatchNorm statistics and
    draw random numbers), so output shapes are checked only when attributing."""
    hooks = Hooks(pl_module)
    if not hooks.default_train_loss:
        return
    try:
        hooks.check_targets(batch)
    except Exception as err:  # whatever it is, attribution would meet it too; training goes on
        rank_zero_warn(f"TrajectoryRecorder records this run, but attributing it will fail as things are: {err}")


def _warn_unreplayable(pl_module: pl.LightningModule, optimizer: Any) -> None:
    """Say at the first batch, not after training, that no replay will reproduce this run (a layer's
    training is out of its reach), and which estimators still attribute it."""
    problems = unreplayable_layers(pl_module)
    if problems:
        sgd = optimizer_name(optimizer) == "SGD"
        rank_zero_warn(
            f"TrajectoryRecorder records this run, but no replay can reproduce it: {'; '.join(problems)}. Unrolled, "
            f"retrain{'' if sgd else ' and Segmented'} will refuse it; Influence(){' and Segmented()' if sgd else ''} "
            "will not."
        )


def _warn_unreplayable_data(manifest: Manifest, dataset: Any) -> None:
    """Say at the start, not after training, what the training set, the callbacks or the precision will keep from
    attribution."""
    if manifest.augmentation == "random":
        rank_zero_warn(
            f"TrajectoryRecorder records this run, but its training set ({type(dataset).__name__}) draws random numbers "
            "when read (augmentation) and is not wrapped in ReplayableAugmentation, so the views it trains on are "
            "lost: Unrolled and retrain will refuse the run, and Influence() sees one fixed view per example. Make "
            "ReplayableAugmentation(dataset) the DataLoader's dataset to replay them."
        )
    elif changes_between_reads(dataset):
        rank_zero_warn(
            f"TrajectoryRecorder records this run, but its training set ({type(dataset).__name__}) changes from one "
            "read to the next even with the global generators seeded: it draws from a generator of its own (such as "
            "a numpy.random.default_rng it holds), and every estimator will refuse the run. Draw augmentation from "
            "torch's or NumPy's global generator, in ReplayableAugmentation(dataset)."
        )
    if manifest.weight_averaging:
        rank_zero_warn(
            f"TrajectoryRecorder records this run, but {', '.join(manifest.weight_averaging)} will leave fit with an "
            "average of the weights training passed through, which the snapshots do not hold: every estimator and "
            "retrain will refuse the run. Record runs without weight averaging to attribute them."
        )
    if manifest.unreplayable_callbacks:
        rank_zero_warn(
            f"TrajectoryRecorder records this run, but {', '.join(manifest.unreplayable_callbacks)} changes training "
            "where no replay follows (the accumulation, the trainable parameters or the weights): Unrolled and "
            "retrain will refuse the run; Influence() attributes its final weights."
        )
    if "mixed" in manifest.precision:
        rank_zero_warn(
            f"TrajectoryRecorder records this run in precision={manifest.precision!r}: retrain will refuse it (its "
            "replay runs in full precision, whose rounding differs), and Unrolled accepts it only while the replay "
            "stays within 2e-2 of the recorded weights (short runs). Influence() attributes it."
        )


def _training_loss(outputs: Any, accumulation: int) -> Tensor | float:
    """The loss ``training_step`` returned, from the outputs Lightning hands ``on_train_batch_end`` (which
    divided it by the accumulation count), or NaN when it returned none. A tensor, read when the snapshot
    is written: reading it here would wait for the device at every micro-batch."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        return math.nan
    # Without accumulation, no multiplication: a tensor op at every step costs more than the rest of the hook.
    return loss.detach() if accumulation == 1 else loss.detach() * accumulation


def _rng_states(device: torch.device) -> dict[str, Tensor]:
    """The states of the generators a training step on ``device`` can draw from (see ``run_format.GENERATORS``)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


class TrajectoryRecorder(Callback):
    r"""Record the weights, learning rates and batch membership of a training run.

    Attribution by influence functions needs the final weights; unrolled differentiation needs the
    whole path. This callback keeps both, in one folder per run under ``dirpath``:

    - ``manifest.json``: package versions, the LightningModule's class path and hyperparameters,
      the seed, the training set's length and fingerprint, the optimizer's class and per-group
      settings, the schedulers, batch size, steps per epoch, gradient accumulation, world size, and
      the list of snapshots with their SHA-256 checksums (brought up to date whenever a checkpoint
      is saved, when training raises, and at the end of training, when it is marked complete), and
      the recording process (host, pid), so readers can tell a run in progress from an abandoned one
      (see ``Trajectory.status``);
    - ``snapshots/step_XXXXXXXX.safetensors`` (read it with ``Trajectory.snapshot``, or without this
      package with ``safetensors.torch.load_file``; see ``run_format.SnapshotContent``): the module's ``state_dict`` at step 0, every
      ``every_n_train_steps`` optimizer steps or ``every_n_epochs`` epochs, and at the end, with the
      learning rate of every parameter group; each snapshot also holds, for every optimizer step
      since the previous snapshot, the dataset indices of each micro-batch (in the order they were
      in the batch), the learning rates (and momentum or betas) that step used and, for each
      micro-batch whose training step drew random numbers (dropout), the state the CPU or CUDA
      generator had at its start, so a replay draws the same masks.

    Batch membership is read from the train DataLoader's sampler: any ``DataLoader`` built with
    ``batch_size`` (``shuffle=True`` or a custom ``sampler``) works unchanged, with or without
    workers. Under multi-process strategies (DDP) each optimizer step records every rank's
    micro-batch, gathered in rank order, and only rank zero writes files. Every file is written to a temporary name and renamed, so a killed run leaves no
    half-written file. The callback's ``state_dict`` (saved in Lightning checkpoints) holds the run
    folder and the steps since the last snapshot, so ``trainer.fit(ckpt_path=...)`` continues the
    same run; snapshots written after that checkpoint are discarded as belonging to the abandoned
    continuation. ``state_dict`` writes nothing; the manifest is written in ``on_save_checkpoint``.
    The run folder is chosen on rank zero and broadcast to the others. Two recorders may share a
    Trainer (their ``state_key`` names ``dirpath`` and ``run_name``).

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

    Example:

        ```python
        from lightning import Trainer, seed_everything
        from lightning_dtda import TrajectoryRecorder

        for seed in range(4):
            seed_everything(seed)
            trainer = Trainer(max_epochs=10, callbacks=[TrajectoryRecorder("runs/")])
            trainer.fit(MyModule(), train_loader)
        ```
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
        self.seed = seed
        # Lightning reads state_key at every hook call (6 a step); generating it each time cost 1% of a small run.
        self._state_key = self._generate_state_key(dirpath=str(self.dirpath), run_name=self.run_name)
        self.membership = BatchMembership()
        self.writer = RunWriter(self.dirpath, run_name, save_optimizer_state)
        self._resuming = False
        self._step_settings: list[dict[str, float]] | None = None
        self._rng_at_start: dict[str, Tensor] = {}
        self._step_rng: list[dict[str, Tensor]] = []
        self._step_losses: list[Tensor | float] = []
        self._best_path = ""  # ModelCheckpoint's best checkpoint when last seen
        self._scale_before_step: float | None = None
        self._hooks_checked = False

    @property
    @override
    def state_key(self) -> str:
        # Two recorders of one Trainer (say, two folders) keep their own state in a checkpoint.
        return self._state_key

    @property
    def run_dir(self) -> Path | None:
        """This run's folder, once training has started."""
        return self.writer.run_dir

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Under multi-process training Lightning replaces the loader by one with a DistributedSampler
        # after the source made it; that loader is wrapped in on_train_start.
        if stage == "fit" and trainer.world_size == 1:
            self.membership.install(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.membership.uninstall()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"TrajectoryRecorder supports one optimizer, found {len(trainer.optimizers)}.")
        self.membership.attach(trainer)
        if self._resuming:
            self.writer.resume(trainer)
            self._resuming = False
            rank_zero_info(f"TrajectoryRecorder: resuming {self.run_dir} at step {trainer.global_step}")
            return
        seed = self.seed
        if seed is None and "PL_GLOBAL_SEED" in os.environ:
            seed = int(os.environ["PL_GLOBAL_SEED"])
        manifest = describe_run(trainer, pl_module, seed, self.membership.batch_size)
        _warn_unreplayable_data(manifest, trainer.train_dataloader.dataset)
        self.writer.start(trainer, manifest)
        self.writer.snapshot(trainer, pl_module)
        rank_zero_info(f"TrajectoryRecorder: recording to {self.run_dir}")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Schedulers step after the optimizer step, so the rate (and momentum) read before any
        # micro-batch of a step is the one that step uses.
        self._step_settings = [{"lr": g["lr"], **scheduled_settings(g)} for g in trainer.optimizers[0].param_groups]
        try:
            # Also once recording stopped: under DDP this is a collective every rank must join, and only rank
            # zero's writer knows that a file could not be written.
            self.membership.on_batch_start(trainer, batch, batch_idx, pl_module.device)
        except RuntimeError as err:  # the run cannot be recorded faithfully from here on: stop, keep training
            self.writer.abandon(str(err), _REPORT)
        if self.writer.failed is not None:
            return
        if not self._hooks_checked:
            self._hooks_checked = True
            _warn_missing_hooks(pl_module, batch)
            _warn_unreplayable(pl_module, trainer.optimizers[0])
        self._rng_at_start = _rng_states(pl_module.device)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # 16-mixed: the gradient scaler skips the step when it finds inf/NaN gradients, and lowers its
        # scale; Lightning counts the step anyway. (The scaler syncs on its own check already.)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scale_before_step = None if scaler is None else scaler.get_scale()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.writer.failed is not None:
            self.membership.take_step()  # nothing is recorded any more: do not keep the indices
            return
        # Keep a generator's state only if this micro-batch drew from it (~5 KB for the CPU's, 16 bytes for CUDA's).
        now = _rng_states(pl_module.device)
        self._step_rng.append({k: v for k, v in self._rng_at_start.items() if not torch.equal(v, now[k])})
        self._step_losses.append(_training_loss(outputs, trainer.accumulate_grad_batches))
        step = self.writer.next_step
        if trainer.global_step == step - 1:  # accumulating: no optimizer step yet
            if not pl_module.automatic_optimization:  # how the user's own accumulation scales the loss is unknown
                self.writer.abandon(
                    f"training_step did not step the optimizer (batch {batch_idx}) under manual "
                    "optimization, accumulating over batches no replay can follow",
                    _MANUAL,
                )
            return
        if trainer.global_step != step or self._step_settings is None:
            if trainer.global_step > step and not pl_module.automatic_optimization:  # two steps in one training_step
                self.writer.abandon(
                    f"training_step stepped the optimizer {trainer.global_step - step + 1} times in one batch "
                    f"(step {trainer.global_step}) under manual optimization",
                    _MANUAL,
                )
                return
            self.writer.abandon(f"it lost track of optimizer steps at step {trainer.global_step}", _REPORT)
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skipped = self._scale_before_step is not None and scaler.get_scale() < self._scale_before_step
        # Under DDP each rank has its own losses; the replay's comparison is for one process.
        losses = self._step_losses if trainer.world_size == 1 and pl_module.automatic_optimization else None
        micro_batches, keys = self.membership.take_step()
        self.writer.add_step(micro_batches, self._step_settings, self._step_rng, skipped, losses, keys)
        self._step_settings, self._step_rng, self._step_losses, self._scale_before_step = None, [], [], None
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.writer.snapshot(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.writer.failed is None:
            try:
                self.membership.follow(trainer)
            except RuntimeError as err:
                self.writer.abandon(str(err), _REPORT)
        manifest, dataset = self.writer.manifest, getattr(trainer.train_dataloader, "dataset", None)
        length = len(dataset) if isinstance(dataset, Sized) else None  # never an error of ours in the user's fit
        if self.writer.failed is None and manifest is not None and length not in (None, manifest.dataset_length):
            # A reloaded DataModule (reload_dataloaders_every_n_epochs) whose training set grew or shrank: the
            # recorded indices would name examples of another set.
            self.writer.abandon(
                f"the training set changed from {manifest.dataset_length} to {length} examples when the "
                "train DataLoader was reloaded",
                "Attribution indexes examples in one training set: keep the set fixed over the run (a curriculum can "
                "weight or sample its examples instead).",
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.writer.snapshot(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.writer.snapshot(trainer, pl_module)
        self.writer.finish()
        # Under DDP, no rank leaves fit before rank zero has marked the run finished: code after fit
        # (the README's attribution lines) would otherwise read a run still in progress.
        trainer.strategy.barrier("TrajectoryRecorder.on_train_end")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Say so in the manifest: a reader then knows this run is abandoned, not in progress.
        self.writer.stop(trainer, pl_module, f"{type(exception).__name__}: {exception}"[:200])

    def write_manifest(self) -> None:
        """Bring the run's manifest up to date with the snapshots taken so far (rank zero), so the
        run can be read while it trains (``AttributionCallback(every_n_epochs=...)`` does). A
        finished run stays marked finished."""
        self.writer.flush()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The weights a checkpoint keeps can be attributed (Attributor(snapshot="best" or its step)): they
        # are snapshotted, and ModelCheckpoint's best is noted (its path is updated before it saves).
        # Not in the middle of an accumulated step: batch norm statistics would already hold forwards of a
        # step the snapshot's steps do not (a replay to that step could not reproduce them).
        if self.run_dir is None:  # before training began (LearningRateFinder's and BatchSizeFinder's own checkpoint)
            return
        between_steps = not self._step_rng
        if between_steps:
            self.writer.snapshot(trainer, pl_module)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best and best != self._best_path:
            self._best_path = best
            self.writer.mark_best(trainer.global_step if between_steps else None)
        # The checkpoint will resume from here, so the manifest must list the snapshots it knows of, and the
        # checkpoint must hold the state after this snapshot (Lightning collected it before this hook).
        self.writer.flush()
        if "callbacks" in checkpoint:
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.writer.state_dict(), "best_path": self._best_path, "passes": self.membership.passes.value}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resuming = self.writer.load_state_dict(state_dict)
        self._best_path = state_dict.get("best_path", "")
        # A resumed run's augmentation keys continue from its passes over the data, not from the first.
        self.membership.passes.value = state_dict.get("passes", 0)
