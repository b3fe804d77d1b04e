"""Read-only views of recorded runs, validated on load."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dtda._io import load_json
from lightning_dtda.errors import DatasetMismatchError, UnfinishedRunError, UnsupportedTrainingError
from lightning_dtda.runs.fingerprint import changes_between_reads, fingerprint_dataset
from lightning_dtda.runs.format import MANIFEST, Manifest, SnapshotContent, SnapshotEntry, Step, comparable

# What a run folder says of its training (see Trajectory.status).
RunStatus = Literal["finished", "in progress", "abandoned", "unfinished"]


class Trajectory:
    """One recorded run: its manifest, snapshots and optimizer steps.

    Args:
        path: The run's folder, as written by ``TrajectoryRecorder``.

    Attributes:
        manifest: What the run's ``manifest.json`` says (see ``Manifest``).

    Raises:
        FileNotFoundError: If the folder has no ``manifest.json``.
        ValueError: If the manifest is unreadable or its format is unknown.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{self.path} holds no {MANIFEST}: it is not a run folder written by TrajectoryRecorder."
            )
        try:
            self.manifest = Manifest.from_json(load_json(self.path / MANIFEST))
        except ValueError as err:
            raise ValueError(f"{self.path / MANIFEST}: {err}") from err

    def __repr__(self) -> str:
        return f"Trajectory({str(self.path)!r}, status={self.status!r}, steps={self.snapshot_steps[-1:]})"

    @property
    def status(self) -> RunStatus:
        """``"finished"`` (training ended), ``"in progress"`` (its recording process still runs),
        ``"abandoned"`` (training raised, or the process is gone: killed or crashed) or ``"unfinished"``
        (recorded on another host, or by a version that did not note its process: either of the last two)."""
        if self.manifest.complete:
            return "finished"
        if self.manifest.stopped is not None:
            return "abandoned"
        writer = self.manifest.writer
        alive = None if writer is None else writer.is_alive()
        if alive is None:
            return "unfinished"
        return "in progress" if alive else "abandoned"

    def describe_status(self) -> str:
        """One line for error messages: the run, its status, and how far it got."""
        writer = self.manifest.writer
        where = "" if writer is None else f" (recorded by process {writer.pid} on {writer.host})"
        stopped = self.manifest.stopped
        if stopped is not None:
            # The recorder gives up without stopping training ("recording failed: ..."), or training stops.
            where = f" ({stopped})" if stopped.startswith("recording failed") else f" (training stopped: {stopped})"
        listed = (
            f"latest listed snapshot at step {self.snapshot_steps[-1]}"
            if self.manifest.snapshots
            else "no snapshot listed yet"
        )
        return f"{self.name}: {self.status}{where}, {listed}"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int | None:
        return self.manifest.seed

    @property
    def dataset_length(self) -> int:
        return self.manifest.dataset_length

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest.dataset_fingerprint

    @property
    def module_class(self) -> str:
        return self.manifest.module_class

    @property
    def snapshots(self) -> tuple[SnapshotEntry, ...]:
        """The listed snapshots, in step order."""
        if not self.manifest.snapshots:
            raise UnfinishedRunError(
                f"{self.describe_status()}: there are no weights to read yet. Wait for the run to reach a "
                "checkpoint or finish, resume it with trainer.fit(ckpt_path=...), or record it again."
            )
        return self.manifest.snapshots

    @property
    def snapshot_steps(self) -> list[int]:
        return [s.step for s in self.manifest.snapshots]

    @property
    def final_step(self) -> int:
        """The step of the latest listed snapshot: the final one once the run has finished."""
        return self.snapshots[-1].step

    def snapshot(self, index: int = -1) -> SnapshotContent:
        """The content of snapshot ``index`` (default: the latest listed), checksum verified."""
        entry = self.snapshots[index]
        return SnapshotContent.load(self.path / entry.file, entry.sha256)

    def state_dict(self, index: int = -1) -> dict[str, torch.Tensor]:
        """The module's ``state_dict`` at snapshot ``index`` (default: the final one)."""
        return self.snapshot(index).state_dict

    @cached_property
    def steps(self) -> list[Step]:
        """Every optimizer step of the run, in order (reads every snapshot once)."""
        steps: list[Step] = []
        for index in range(len(self.snapshots)):
            first, block = self.snapshot(index).decoded_steps()
            if first != len(steps) + 1 and block:
                raise ValueError(
                    f"{self.path} has no batch membership for steps {len(steps) + 1} to {first - 1}: the "
                    "snapshot that recorded them is missing from the manifest. Record the run again."
                )
            steps.extend(block)
        if len(steps) != self.final_step:
            raise ValueError(
                f"{self.path}: recorded {len(steps)} optimizer steps but the final snapshot is at step {self.final_step}."
            )
        return steps

    def upto(self, snapshot: int | str) -> Trajectory:
        """This run as if it had ended at a snapshot: ``"final"`` (itself), ``"best"`` (the snapshot of
        ``ModelCheckpoint``'s best checkpoint) or a snapshot's step. Every estimator then attributes the
        weights there (``Unrolled`` replays the run up to that step).

        Raises:
            ValueError: For a step without a snapshot (the message lists them), or ``"best"`` for a run
                without a recorded best checkpoint.
        """
        if snapshot == "final":
            return self
        if snapshot == "best":
            step = self.manifest.best_step
            if step is None:
                raise ValueError(
                    f"Run {self.name} recorded no best checkpoint: it was trained without a ModelCheckpoint that saved, "
                    "its best checkpoint was saved inside an accumulated step (validation after a number of batches "
                    "that accumulate_grad_batches does not divide: no snapshot can hold it), or it was recorded "
                    "before 0.3. Give a snapshot's step instead, one of "
                    f"{self.snapshot_steps}."
                )
        elif isinstance(snapshot, int) and not isinstance(snapshot, bool):
            step = snapshot
        else:
            raise ValueError(f"snapshot must be 'final', 'best' or a snapshot's step, got {snapshot!r}.")
        if step not in self.snapshot_steps:
            raise ValueError(
                f"Run {self.name} has no snapshot at step {step}; its snapshots are at steps {self.snapshot_steps}. "
                "Record with every_n_train_steps or every_n_epochs to have more, or with a ModelCheckpoint (every "
                "checkpoint saved is snapshotted)."
            )
        cut = copy.copy(self)
        kept = tuple(entry for entry in self.manifest.snapshots if entry.step <= step)
        cut.manifest = replace(self.manifest, snapshots=kept)
        cut.__dict__.pop("steps", None)  # the cached steps of the whole run
        return cut

    def check_dataset(self, data: Any) -> None:
        """Raise ``DatasetMismatchError`` unless ``data`` has the recorded length and fingerprint."""
        n = len(data)
        if n != self.dataset_length:
            raise DatasetMismatchError(
                f"train_data has {n} examples but run {self.name} was recorded on {self.dataset_length}. Pass the "
                "dataset of the training DataLoader, in its original order."
            )
        fingerprint = fingerprint_dataset(data)
        if fingerprint != self.dataset_fingerprint:
            if changes_between_reads(data):
                # Fingerprints seed torch's, NumPy's and Python's global generators: a read that still changes
                # draws from a generator of the dataset's own.
                raise DatasetMismatchError(
                    f"train_data's items change from one read to the next, so it cannot be compared with the data run "
                    f"{self.name} was recorded on: it draws random numbers from a generator of its own (such as a "
                    "numpy.random.default_rng it holds), which nothing can seed or replay. Draw augmentation from "
                    "torch's or NumPy's global generator (and wrap the training set in ReplayableAugmentation to "
                    "replay it), or pass the data without it."
                )
            raise DatasetMismatchError(
                f"train_data differs from the data run {self.name} was recorded on (same length, different "
                "content or order). Pass the dataset of the training DataLoader, in its original order."
            )

    @property
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The optimizer's per-group settings (learning rate, momentum, weight decay, ...)."""
        return self.manifest.param_groups

    @property
    def weight_decay(self) -> float:
        """The optimizer's weight decay (first parameter group), 0 when it had none."""
        return float(self.optimizer_groups[0].get("weight_decay") or 0.0)


def load_runs(path: str | Path, unfinished: bool = False) -> list[Trajectory]:
    """Load one run folder, or every run folder directly under ``path`` (an ensemble), sorted by name.

    Args:
        path: A run folder or a folder of them (a ``TrajectoryRecorder``'s ``dirpath``).
        unfinished: Also load runs that have not finished (see ``Trajectory.status``): their latest
            listed snapshot then stands in for the final weights. By default they are refused, so a
            run still training, or one that was killed, is never pooled with finished runs by mistake.

    Raises:
        FileNotFoundError: If ``path`` holds no run.
        ValueError: If a run has not finished (unless ``unfinished``; the message says which and why),
            or the runs trained different module classes or on different datasets.
    """
    path = Path(path)
    runs = find_runs(path)
    pending = [run for run in runs if run.status != "finished" and not (unfinished and run.manifest.snapshots)]
    if pending:
        lines = "\n".join(f"  - {run.describe_status()}" for run in pending)
        advice = (
            "Wait for runs in progress, resume abandoned ones with trainer.fit(ckpt_path=...) where a checkpoint "
            f"was saved, record them again or delete their folders, or pass load_runs({str(path)!r}, unfinished=True) as the Attributor's runs to pool each "
            "run's latest snapshot as if it were final."
        )
        if unfinished:
            advice = "They have no snapshot listed yet; wait for a checkpoint or the end of training, or delete their folders."
        raise UnfinishedRunError(f"{path} holds runs that have not finished:\n{lines}\n{advice}")
    check_poolable(runs)
    partial = [run for run in runs if run.status != "finished"]
    if partial:
        warnings.warn(
            "Pooling runs that have not finished, at their latest snapshot: "
            + ", ".join(f"{run.name} (step {run.final_step}, {run.status})" for run in partial)
            + f"; the runs' final steps are {sorted({run.final_step for run in runs})}.",
            stacklevel=2,
        )
    return runs


def find_runs(path: Path) -> list[Trajectory]:
    """Every run in ``path`` (a run folder or a folder of them), sorted by name, whatever its status.

    Raises:
        FileNotFoundError: If ``path`` holds no run.
    """
    if (path / MANIFEST).is_file():
        return [Trajectory(path)]
    folders = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
    if not folders:
        raise FileNotFoundError(
            f"{path} holds no recorded run (no {MANIFEST} in it or in its subfolders). Point at the "
            "TrajectoryRecorder's dirpath or at one run folder inside it."
        )
    return [Trajectory(p) for p in folders]


def check_poolable(runs: list[Trajectory]) -> None:
    """Raise ``ValueError`` unless the runs trained one module class on one dataset (``DatasetMismatchError``
    for datasets); warn if they were trained differently (see ``recipe_differences``)."""
    first = runs[0]
    for run in runs[1:]:
        if run.module_class != first.module_class:
            raise ValueError(f"The runs mix {first.module_class} ({first.name}) and {run.module_class} ({run.name}).")
        if run.dataset_fingerprint != first.dataset_fingerprint:
            raise DatasetMismatchError(
                f"The runs mix datasets: {first.name} and {run.name} have different fingerprints."
            )
    differences = recipe_differences(runs)
    if differences:
        # Not refused: runs over several learning rates, say, may be the distribution meant. Most often a folder
        # holds seeds of an earlier setting (train_seeds skips finished seeds), which pooling would mix silently.
        rank_zero_warn(
            f"The runs were trained differently: {'; '.join(differences)}. They are pooled as draws of one "
            "distribution of training runs; if that is not meant, attribute each setting's runs on their own.",
            stacklevel=6,  # past rank_zero_warn's three frames, this function and load_runs: the user's line
        )


def metric_driven(runs: list[Trajectory]) -> str | None:
    """Which runs' course followed a validation metric, and through what, as ``"seed_0, seed_1 (EarlyStopping(...),
    ReduceLROnPlateau)"``; ``None`` if none did. A removal can change the metric, and with it the epoch training
    stopped at or the steps the learning rate fell at, which neither estimators nor ``retrain`` (both hold the
    recorded steps and learning rates) can follow."""

    def causes(run: Trajectory) -> list[str]:
        plateaus = [s["class"].rpartition(".")[2] for s in run.manifest.schedulers if s["class"].endswith("Plateau")]
        return [*run.manifest.early_stopping, *plateaus]

    driven = [run for run in runs if causes(run)]
    if not driven:
        return None
    return f"{', '.join(run.name for run in driven)} ({', '.join(sorted({c for run in driven for c in causes(run)}))})"


def runs_to_attribute(
    runs: str | Path | Sequence[Trajectory], train_data: Any, snapshot: Literal["final", "best"] | int
) -> list[Trajectory]:
    """The runs the Attributor and ``retrain`` take, each up to ``snapshot``: a folder loaded (``load_runs``), or
    trajectories checked as it checks a folder's (``check_poolable``); refused if trained with weight averaging
    (the model fit left is an average the snapshots do not hold) or on another dataset than ``train_data``."""
    if isinstance(runs, (str, Path)):
        runs = load_runs(runs)
    else:
        runs = list(runs)
        check_poolable(runs)
    averaged = [
        f"{run.name} ({', '.join(run.manifest.weight_averaging)})" for run in runs if run.manifest.weight_averaging
    ]
    if averaged:
        raise UnsupportedTrainingError(
            f"Runs trained with weight averaging: {', '.join(averaged)}. The model fit left is an average of the "
            "weights training passed through, which the snapshots do not hold, and no estimator or replay follows "
            "the averaging: its effects would be those of another model. Record the runs without weight averaging."
        )
    runs = [run.upto(snapshot) for run in runs]
    runs[0].check_dataset(train_data)
    return runs


# What the manifest says of how a run was trained, beside its seed (which is meant to differ).
_RECIPE = (
    "optimizer_class",
    "param_groups",
    "schedulers",
    "batch_size",
    "drop_last",
    "batches_per_epoch",
    "accumulate_grad_batches",
    "world_size",
    "precision",
    "max_epochs",
    "max_steps",
    "gradient_clipping",
    "early_stopping",
    "weight_averaging",
    "unreplayable_callbacks",
)


def _flat(name: str, value: Any) -> dict[str, Any]:
    """``value`` by its leaves' names (``param_groups[0].lr``), so a difference names its setting."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{name}.{key}", item).items()}
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(f"{name}[{i}]", item).items()}
    return {name: value}


def recipe_differences(runs: list[Trajectory]) -> list[str]:
    """How the runs' training settings differ, one line per setting that does (``"max_epochs: 5 (seed_0,
    seed_1), 10 (seed_2)"``): the manifest's optimizer, schedulers, batch size, batches per epoch, accumulation,
    precision, epochs, steps, clipping, EarlyStopping and hyperparameters (but a hyperparameter that holds each run's own seed;
    memory addresses in reprs are left out)."""
    recipes = []
    for run in runs:
        manifest = run.manifest
        recipe = {k: v for name in _RECIPE for k, v in _flat(name, getattr(manifest, name)).items()}
        # Not the keys Lightning adds itself (LightningCLI's "_instantiator"): one run from the CLI, one from Python.
        recipe.update({f"hparams.{k}": v for k, v in manifest.hparams.items() if not k.startswith("_")})
        recipes.append({k: json.dumps(comparable(v), sort_keys=True, default=str) for k, v in recipe.items()})
    seeds = [json.dumps(run.manifest.seed) for run in runs]
    lines = []
    for key in dict.fromkeys(k for recipe in recipes for k in recipe):
        values = [recipe.get(key, "(none)") for recipe in recipes]
        if len(set(values)) == 1 or (key.startswith("hparams.") and values == seeds):
            continue
        groups: dict[str, list[str]] = {}
        for run, value in zip(runs, values):
            groups.setdefault(value, []).append(run.name)
        shown = ", ".join(
            f"{value if len(value) <= 200 else value[:200] + '...'} ({', '.join(names)})"
            for value, names in groups.items()
        )
        lines.append(f"{key}: {shown}")
    return lines
