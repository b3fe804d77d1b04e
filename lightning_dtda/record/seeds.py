"""Training several seeds of a module into one folder of runs."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_dtda.record.recorder import TrajectoryRecorder, early_stopping
from lightning_dtda.runs.fingerprint import fingerprint_dataset
from lightning_dtda.runs.format import MANIFEST, comparable, jsonable, same_class
from lightning_dtda.runs.trajectory import Trajectory


def train_seeds(
    make_module: Callable[[], pl.LightningModule],
    data: pl.LightningDataModule | Any,
    dirpath: str | Path,
    seeds: Iterable[int],
    recorder: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> Path:
    """Train one run per seed, one after another, each recorded into ``dirpath/seed_<seed>``.

    For each seed: ``seed_everything(seed)``, a fresh module from ``make_module()``, a fresh
    ``Trainer(**trainer_kwargs)`` with a ``TrajectoryRecorder`` added, and ``fit``. A seed whose
    run has finished is skipped and its files are left untouched, so an interrupted call can simply be
    repeated (a finished run of another module class, other hyperparameters, other ``max_epochs``,
    ``max_steps``, accumulation, clipping or precision or, for a DataLoader, another batch size or training set
    is refused instead: it would be pooled as if this call had trained it); an abandoned one (a
    killed job) is recorded again from scratch; one still in progress
    in another process is refused.

    Args:
        make_module: Builds the LightningModule; called after seeding, so initialisation follows the seed.
        data: A ``LightningDataModule`` or a train ``DataLoader`` (reused for every seed).
        dirpath: The folder of runs, as given to the Attributor afterwards.
        seeds: The seeds to train.
        recorder: Keyword arguments for ``TrajectoryRecorder`` (not ``dirpath``, ``run_name``, ``seed``).
        trainer_kwargs: Keyword arguments for ``lightning.pytorch.Trainer``; each seed gets a fresh copy of
            ``callbacks`` as given (``EarlyStopping`` and ``ModelCheckpoint`` keep state across a fit), with the
            recorder appended.

    Returns:
        ``dirpath``.
    """
    dirpath = Path(dirpath)
    extra_callbacks = list(trainer_kwargs.pop("callbacks", []) or [])
    probe: pl.Trainer | None = None  # the settings as Lightning resolves them, for comparing with finished runs
    fingerprint: str | None = None  # the DataLoader's dataset's, once (a DataModule's is not built before fit)
    for seed in seeds:
        run_dir = dirpath / f"seed_{seed}"
        if (run_dir / MANIFEST).is_file():
            run = Trajectory(run_dir)
            if run.status == "finished":
                pl.seed_everything(seed, verbose=False)
                probe = probe or pl.Trainer(**trainer_kwargs)
                if fingerprint is None and isinstance(data, DataLoader):
                    fingerprint = fingerprint_dataset(data.dataset)
                limits = _lightning_limits(trainer_kwargs, extra_callbacks)
                _check_same_setup(run, make_module(), data, fingerprint, probe, limits, extra_callbacks)
                rank_zero_info(f"train_seeds: {run_dir} is already recorded; skipping seed {seed}.")
                continue
            if run.status in ("in progress", "unfinished"):  # unfinished: another host's process, maybe alive
                raise RuntimeError(
                    f"train_seeds: {run.describe_status()}; wait for it or stop that process first (or delete {run_dir} "
                    "yourself if you know it is dead)."
                )
            rank_zero_info(f"train_seeds: recording seed {seed} again ({run.describe_status()}).")
            shutil.rmtree(run_dir)
        pl.seed_everything(seed)
        module = make_module()
        callbacks = [*_fresh(extra_callbacks), TrajectoryRecorder(dirpath, seed=seed, **(recorder or {}))]
        trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, data)
    return dirpath


def _fresh(callbacks: list[Any]) -> list[Any]:
    """A copy of each callback as given, for one seed: EarlyStopping's patience count and ModelCheckpoint's best
    carried over from the previous seed stopped the next seeds after a few steps (a new-user trial)."""
    try:
        return copy.deepcopy(callbacks)
    except Exception as err:  # whatever it holds (a lock, an open file), the seeds must not share its state
        raise TypeError(
            f"train_seeds gives every seed a fresh copy of the callbacks, but one of them cannot be copied ({err}). "
            "Train the seeds in your own loop, building the callbacks anew for each (see the README)."
        ) from err


def _lightning_limits(trainer_kwargs: dict[str, Any], callbacks: list[Any]) -> tuple[int, int]:
    """``(max_epochs, max_steps)`` as Lightning resolves them at fit, and the recorder records them: without
    ``max_epochs``, 1000 unless ``max_steps`` or a time limit is set, and -1 (no limit) if one is."""
    max_steps = trainer_kwargs.get("max_steps", -1)
    max_epochs = trainer_kwargs.get("max_epochs")
    if max_epochs is None:
        timed = trainer_kwargs.get("max_time") is not None or any(isinstance(c, Timer) for c in callbacks)
        max_epochs = 1000 if max_steps == -1 and not timed else -1
    return max_epochs, max_steps


def _check_same_setup(
    run: Trajectory,
    module: pl.LightningModule,
    data: Any,
    fingerprint: str | None,
    trainer: pl.Trainer,
    limits: tuple[int, int],
    callbacks: list[Any],
) -> None:
    """Refuse to skip a finished run that another module, other hyperparameters, another training set
    (``fingerprint``: a DataLoader's dataset's) or other Trainer settings (``trainer``, not fitted; ``limits``:
    ``_lightning_limits``; the ``callbacks``' EarlyStopping) made: the Attributor would pool it as if this call had trained it."""
    manifest = run.manifest
    clipping = manifest.gradient_clipping or {}
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
    settings = (
        ("max_epochs", manifest.max_epochs, limits[0]),
        ("max_steps", manifest.max_steps, limits[1]),
        ("accumulate_grad_batches", manifest.accumulate_grad_batches, trainer.accumulate_grad_batches),
        ("gradient_clip_val", clipping.get("value"), trainer.gradient_clip_val),
        ("gradient_clip_algorithm", clipping.get("algorithm", algorithm), algorithm),
        ("precision", manifest.precision, str(trainer.precision)),
        ("EarlyStopping", manifest.early_stopping, early_stopping(callbacks)),
    )
    differences = [f"{key}={recorded!r}, not {given!r}" for key, recorded, given in settings if recorded != given]
    if not same_class(type(module), run.module_class):  # moved to another module path: the Attributor's rule
        differences.append(f"module {run.module_class}, not {type(module).__module__}.{type(module).__qualname__}")
    hparams = {k: jsonable(v) for k, v in dict(module.hparams).items()}
    differences += [
        f"{k}={v!r}, not {hparams[k]!r}"
        for k, v in run.manifest.hparams.items()
        if k in hparams and comparable(hparams[k]) != comparable(v)
    ]
    if isinstance(data, DataLoader) and data.batch_size is not None and data.batch_size != manifest.batch_size:
        differences.append(f"batch_size={manifest.batch_size}, not {data.batch_size}")
    if fingerprint is not None and (len(data.dataset) != run.dataset_length or fingerprint != run.dataset_fingerprint):
        differences.append("another training set")
    if differences:
        raise RuntimeError(
            f"train_seeds: {run.path} holds a finished run of another setup ({'; '.join(differences)}), which would be "
            "pooled as if this call had trained it. Give another dirpath, or delete the folder to record it again."
        )
