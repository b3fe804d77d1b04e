"""Training several seeds of a module into one folder of runs."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_dtda.record.recorder import TrajectoryRecorder
from lightning_dtda.runs.format import MANIFEST
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
    repeated; an abandoned one (a killed job) is recorded again from scratch; one still in progress
    in another process is refused.

    Args:
        make_module: Builds the LightningModule; called after seeding, so initialisation follows the seed.
        data: A ``LightningDataModule`` or a train ``DataLoader`` (reused for every seed).
        dirpath: The folder of runs, as given to the Attributor afterwards.
        seeds: The seeds to train.
        recorder: Keyword arguments for ``TrajectoryRecorder`` (not ``dirpath``, ``run_name``, ``seed``).
        trainer_kwargs: Keyword arguments for ``lightning.pytorch.Trainer``; ``callbacks`` are kept
            and the recorder appended.

    Returns:
        ``dirpath``.
    """
    dirpath = Path(dirpath)
    extra_callbacks = list(trainer_kwargs.pop("callbacks", []) or [])
    for seed in seeds:
        run_dir = dirpath / f"seed_{seed}"
        if (run_dir / MANIFEST).is_file():
            run = Trajectory(run_dir)
            if run.status == "finished":
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
        callbacks = [*extra_callbacks, TrajectoryRecorder(dirpath, seed=seed, **(recorder or {}))]
        trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, data)
    return dirpath
