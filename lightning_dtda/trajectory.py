"""Read-only views of recorded runs, validated on load."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dtda._io import load_archive, load_json
from lightning_dtda.data import fingerprint_dataset

MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = 2  # 2: snapshots are archives (see _io), not torch.save files


def jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot hold replaced by its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


@dataclass(frozen=True)
class Step:
    """One optimizer step: the dataset indices of each of its micro-batches, and its learning rates.

    With gradient accumulation over ``A`` micro-batches on ``W`` processes, Lightning divides each
    micro-batch's mean loss by ``A`` and DDP averages over the ranks, so the step's gradient is
    ``(1/(A W)) * sum over its micro-batches of their mean gradient`` (micro-batches in rank order).
    """

    micro_batches: tuple[torch.Tensor, ...]
    lrs: tuple[float, ...]


class Trajectory:
    """One recorded run: its manifest, snapshots and optimizer steps.

    Args:
        path: The run's folder, as written by :class:`~lightning_dtda.TrajectoryRecorder`.

    Raises:
        FileNotFoundError: If the folder has no ``manifest.json``.
        ValueError: If the manifest is unreadable, lists no snapshot, or its format is unknown.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{self.path} holds no {MANIFEST}: it is not a run folder written by TrajectoryRecorder."
            )
        self.manifest: dict[str, Any] = load_json(self.path / MANIFEST)
        if self.manifest.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(
                f"{self.path / MANIFEST} has format {self.manifest.get('format')!r}, but this version of lightning-dtda "
                f"reads format {SNAPSHOT_FORMAT}. Record the run again with this version."
            )
        if not self.manifest["snapshots"]:
            raise ValueError(
                f"{self.path} lists no snapshot: the run stopped before it finished or reached a checkpoint. "
                "Resume it with trainer.fit(ckpt_path=...) or record it again."
            )

    def __repr__(self) -> str:
        return f"Trajectory({str(self.path)!r}, steps={self.final_step})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int | None:
        return self.manifest["seed"]

    @property
    def dataset_length(self) -> int:
        return self.manifest["dataset"]["length"]

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]

    @property
    def module_class(self) -> str:
        return self.manifest["module"]["class"]

    @property
    def snapshot_steps(self) -> list[int]:
        return [s["step"] for s in self.manifest["snapshots"]]

    @property
    def final_step(self) -> int:
        return self.snapshot_steps[-1]

    def snapshot(self, index: int = -1) -> dict[str, Any]:
        """The snapshot file's content (``state_dict``, ``lrs``, ``steps``, ...), checksum verified."""
        entry = self.manifest["snapshots"][index]
        return load_archive(self.path / entry["file"], entry["sha256"])

    def state_dict(self, index: int = -1) -> dict[str, torch.Tensor]:
        """The module's ``state_dict`` at snapshot ``index`` (default: the final one)."""
        return self.snapshot(index)["state_dict"]

    @cached_property
    def steps(self) -> list[Step]:
        """Every optimizer step of the run, in order (reads every snapshot once)."""
        steps: list[Step] = []
        for index in range(len(self.manifest["snapshots"])):
            record = self.snapshot(index)["steps"]
            if record["first"] != len(steps) + 1 and len(record["micro_batches_per_step"]):
                raise ValueError(
                    f"{self.path} has no batch membership for steps {len(steps) + 1} to {record['first'] - 1}: the "
                    "snapshot that recorded them is missing from the manifest. Record the run again."
                )
            micro = torch.split(record["indices"], record["micro_batch_sizes"].tolist())
            per_step = record["micro_batches_per_step"].tolist()
            offsets = [0]
            for n in per_step:
                offsets.append(offsets[-1] + n)
            for k in range(len(per_step)):
                steps.append(Step(tuple(micro[offsets[k] : offsets[k + 1]]), tuple(record["lrs"][k].tolist())))
        if len(steps) != self.final_step:
            raise ValueError(f"{self.path}: recorded {len(steps)} optimizer steps but the final snapshot is at step {self.final_step}.")
        return steps

    def check_dataset(self, data: Any) -> None:
        """Raise ``ValueError`` unless ``data`` has the recorded length and fingerprint."""
        n = len(data)
        if n != self.dataset_length:
            raise ValueError(
                f"train_data has {n} examples but run {self.name} was recorded on {self.dataset_length}. Pass the "
                "dataset of the training DataLoader, in its original order."
            )
        if fingerprint_dataset(data) != self.dataset_fingerprint:
            raise ValueError(
                f"train_data differs from the data run {self.name} was recorded on (same length, different "
                "content or order). Pass the dataset of the training DataLoader, in its original order."
            )

    @property
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The optimizer's per-group settings (learning rate, momentum, weight decay, ...)."""
        return self.manifest["optimizer"]["param_groups"]

    @property
    def weight_decay(self) -> float:
        """The optimizer's weight decay (first parameter group), 0 when it had none."""
        return float(self.optimizer_groups[0].get("weight_decay") or 0.0)

    def learning_rate_time(self, first: int = 0, last: int | None = None) -> float:
        r"""Total effective step size :math:`\sum_t \eta_t / (1 - \beta)` of steps ``first+1 .. last``
        (default: the whole run), first parameter group.

        Momentum ``beta`` of SGD makes each gradient move the weights ``1 / (1 - beta)`` times as far
        as one plain step of the same rate; Adam has no ``momentum`` setting and is not rescaled.
        """
        momentum = float(self.optimizer_groups[0].get("momentum") or 0.0)
        return sum(step.lrs[0] for step in self.steps[first:last]) / (1.0 - momentum)


def instantiate(
    module: type[nn.Module] | nn.Module, run: Trajectory, snapshot: int = -1, device: torch.device | str = "cpu"
) -> nn.Module:
    """The module of ``run`` at ``snapshot`` (default: the final one), in eval mode on ``device``.

    Args:
        module: The LightningModule class, built from the run's recorded hyperparameters, or an
            instance, deep-copied so the caller's module is left untouched.

    Raises:
        ValueError: If the run trained another class.
        TypeError: If the class cannot be built from the recorded hyperparameters.
    """
    if isinstance(module, nn.Module):
        cls: type = type(module)
        model = copy.deepcopy(module)
    else:
        cls, model = module, None
    path = f"{cls.__module__}.{cls.__qualname__}"
    if path != run.module_class:
        raise ValueError(f"Run {run.name} trained {run.module_class}, not {path}.")
    if model is None:
        try:
            model = cls(**run.manifest["module"]["hparams"])
        except TypeError as err:
            raise TypeError(
                f"Could not build {path} from the recorded hyperparameters ({err}). Call "
                "`self.save_hyperparameters()` in its __init__, or pass an instance instead of the class."
            ) from err
    state = run.state_dict(snapshot)
    # Lightning's "64-true" (or "bf16-true") converts the module after construction; match it.
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype=dtype)
    model.load_state_dict(state)
    return model.to(device).eval()


def load_runs(path: str | Path) -> list[Trajectory]:
    """Load one run folder, or every run folder directly under ``path`` (an ensemble), sorted by name.

    Raises:
        FileNotFoundError: If ``path`` holds no run.
        ValueError: If the runs trained different module classes or on different datasets.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        runs = [Trajectory(path)]
    else:
        folders = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
        if not folders:
            raise FileNotFoundError(
                f"{path} holds no recorded run (no {MANIFEST} in it or in its subfolders). Point at the "
                "TrajectoryRecorder's dirpath or at one run folder inside it."
            )
        runs = [Trajectory(p) for p in folders]
    first = runs[0]
    for run in runs[1:]:
        if run.module_class != first.module_class:
            raise ValueError(f"{path} mixes runs of {first.module_class} ({first.name}) and {run.module_class} ({run.name}).")
        if run.dataset_fingerprint != first.dataset_fingerprint:
            raise ValueError(f"{path} mixes runs on different datasets: {first.name} and {run.name} have different fingerprints.")
    return runs
