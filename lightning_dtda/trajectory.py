"""Read-only views of recorded runs, validated on load."""

from __future__ import annotations

import copy
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dtda._io import load_json
from lightning_dtda.data import fingerprint_dataset
from lightning_dtda.run_format import MANIFEST, Manifest, SnapshotContent, SnapshotEntry, Step, jsonable, module_fingerprint


class Trajectory:
    """One recorded run: its manifest, snapshots and optimizer steps.

    Args:
        path: The run's folder, as written by :class:`~lightning_dtda.TrajectoryRecorder`.

    Attributes:
        manifest: What the run's ``manifest.json`` says (see :class:`~lightning_dtda.run_format.Manifest`).

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
    def status(self) -> str:
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
        if self.manifest.stopped is not None:
            where = f" (training stopped: {self.manifest.stopped})"
        listed = f"latest listed snapshot at step {self.snapshot_steps[-1]}" if self.manifest.snapshots else "no snapshot listed yet"
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
            raise ValueError(
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
        return self.manifest.param_groups

    @property
    def weight_decay(self) -> float:
        """The optimizer's weight decay (first parameter group), 0 when it had none."""
        return float(self.optimizer_groups[0].get("weight_decay") or 0.0)

    def learning_rate_time(self, first: int = 0, last: int | None = None) -> float:
        r"""Total effective step size :math:`\sum_t \eta_t s_t` of steps ``first+1 .. last`` (default:
        the whole run), first parameter group.

        ``s_t`` is how far one unit of gradient moves the weights per unit of learning rate. SGD with
        momentum ``beta``: ``1 / (1 - beta)`` (the step's own ``beta`` where a schedule changed it).
        Adam, AdamW: the median of ``1 / (sqrt(v_hat) + eps)`` over the parameters' entries, recorded at
        each snapshot (``SnapshotEntry.step_scale``) and used for the steps up to it (Adam's ``beta1``
        averages gradients rather than summing them, so it adds no factor).

        Steps that 16-mixed's gradient scaler skipped moved nothing and count for nothing.

        Raises:
            ValueError: For another optimizer, whose step per unit of gradient this does not model, and
                for an Adam run recorded without step scales (before 0.3).
        """
        optimizer = self.manifest.optimizer_class.rpartition(".")[2]
        if optimizer in ("Adam", "AdamW"):
            scaled = zip(self.steps, self._adam_scales())
            return sum(step.lrs[0] * scale for step, scale in list(scaled)[first:last] if not step.skipped)
        if optimizer != "SGD":
            raise ValueError(
                f"The learning-rate time models SGD, Adam and AdamW, whose step per unit of gradient is known; run {self.name} "
                f"trained with {optimizer}: give a damping."
            )
        momentum = float(self.optimizer_groups[0].get("momentum") or 0.0)
        # A momentum schedule (recorded per step since 0.2) gives each step its own factor.
        return sum(
            step.lrs[0] / (1.0 - step.scheduled.get("momentum", (momentum,))[0]) for step in self.steps[first:last] if not step.skipped
        )

    def _adam_scales(self) -> list[float]:
        """Each step's Adam step scale: that of the snapshot closing its interval."""
        scales = []
        for previous, entry in zip(self.snapshots, self.snapshots[1:]):
            skipped = all(step.skipped for step in self.steps[previous.step : entry.step])
            if entry.step_scale is None and not skipped:  # all skipped: Adam had no state yet, and none is needed
                raise ValueError(
                    f"Run {self.name} trained with {self.manifest.optimizer_class.rpartition('.')[2]}, whose step per unit of "
                    "gradient the recorder noted only from version 0.3 on, and this run lacks it: record it again, or "
                    "give a damping."
                )
            scales += [entry.step_scale or 0.0] * (entry.step - previous.step)
        return scales


def same_class(cls: type, recorded: str) -> bool:
    """Whether ``cls`` may stand for the class a run recorded as ``recorded``: it has the same qualified name.

    The module part is not compared: a class defined in the script that trained is recorded as
    ``__main__.Net`` and imported elsewhere as ``train.Net``, and code moves between modules. The
    hyperparameters and weights then decide (see :func:`instantiate`).
    """
    return recorded.endswith("." + cls.__qualname__)


def instantiate(
    module: type[nn.Module] | nn.Module, run: Trajectory, snapshot: int = -1, device: torch.device | str = "cpu"
) -> nn.Module:
    """The module of ``run`` at ``snapshot`` (default: the final one), in eval mode on ``device``.

    Args:
        module: The LightningModule class, built from the run's recorded hyperparameters, or an
            instance, deep-copied so the caller's module is left untouched.

    Raises:
        ValueError: If the run trained another class, or ``module`` is an instance whose parameters do not
            fit the run's weights (the message names the hyperparameters that differ from the run's).
        TypeError: If the class cannot be built from the recorded hyperparameters.

    Warns: when a class of the same qualified name in another module is taken for the recorded one (a
    class defined in the training script is recorded as ``__main__.Net`` and imported elsewhere as
    ``train.Net``; see :func:`same_class`), and when an instance has other hyperparameters than the
    run's but fits its weights.
    """
    if isinstance(module, nn.Module):
        cls: type = type(module)
        model = copy.deepcopy(module)
    else:
        cls, model = module, None
    path = f"{cls.__module__}.{cls.__qualname__}"
    if not same_class(cls, run.module_class):
        raise ValueError(
            f"Run {run.name} trained {run.module_class}, not {path}. Pass the class the run trained (a class defined in "
            "the training script can be imported from it; one of the same name in another module is taken for it), or an "
            "instance of it."
        )
    if path != run.module_class:
        warnings.warn(f"Run {run.name} recorded its module class as {run.module_class}; taking {path}, of the same name, for it.", stacklevel=2)
    if model is None:
        try:
            model = cls(**run.manifest.hparams)
        except TypeError as err:
            raise TypeError(
                f"Could not build {path} from the recorded hyperparameters ({err}). Call "
                "`self.save_hyperparameters()` in its __init__, or pass an instance instead of the class."
            ) from err
    # Only plain values compare: others were recorded as their repr, which may hold an address.
    given = {k: v for k, v in dict(getattr(model, "hparams", {})).items() if v is None or isinstance(v, (bool, int, float, str))}
    differ = [k for k, v in run.manifest.hparams.items() if k in given and jsonable(given[k]) != v]
    differences = (
        f"run {run.name} was trained with {', '.join(f'{k}={run.manifest.hparams[k]!r}' for k in differ)}; the module given "
        f"has {', '.join(f'{k}={given[k]!r}' for k in differ)}"
    )
    state = run.state_dict(snapshot)
    # Lightning's "64-true" (or "bf16-true") converts the module after construction; match it.
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype=dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"The module given does not match run {run.name}'s weights ({str(err).splitlines()[-1].strip().rstrip('.')})"
            f"{': ' + differences if differ else ''}. Pass the class (it is built from the recorded hyperparameters) or an "
            "instance built with the run's."
        ) from None
    if differ:
        warnings.warn(f"The module given is not the one trained: {differences}. Effects are the given module's.", stacklevel=2)
    recorded, now = run.manifest.module_fingerprint or {}, module_fingerprint(model)
    # Other hyperparameters (warned about above) change the structure's repr by themselves.
    changed = [w for w in ("source",) + (() if differ else ("structure",)) if w in recorded and w in now and recorded[w] != now[w]]
    if changed:
        what = {"structure": "its layers (repr)", "source": "its class's source code"}
        warnings.warn(
            f"{path} is not the code that trained run {run.name}: {' and '.join(what[c] for c in changed)} differ from what "
            "was recorded, though its name and weights fit. Effects are those of the code given; attribute with the "
            "code that trained the run (an edited docstring or comment also changes the source).",
            stacklevel=2,
        )
    return model.to(device).eval()


def load_runs(path: str | Path, unfinished: bool = False) -> list[Trajectory]:
    """Load one run folder, or every run folder directly under ``path`` (an ensemble), sorted by name.

    Args:
        path: A run folder or a folder of them (a ``TrajectoryRecorder``'s ``dirpath``).
        unfinished: Also load runs that have not finished (see :attr:`Trajectory.status`): their latest
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
            "Wait for runs in progress, resume abandoned ones with trainer.fit(ckpt_path=...) or delete their "
            f"folders, or pass load_runs({str(path)!r}, unfinished=True) as the Attributor's runs to pool each "
            "run's latest snapshot as if it were final."
        )
        if unfinished:
            advice = "They have no snapshot listed yet; wait for a checkpoint or the end of training, or delete their folders."
        raise ValueError(f"{path} holds runs that have not finished:\n{lines}\n{advice}")
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
    """Raise ``ValueError`` unless the runs trained one module class on one dataset."""
    first = runs[0]
    for run in runs[1:]:
        if run.module_class != first.module_class:
            raise ValueError(f"The runs mix {first.module_class} ({first.name}) and {run.module_class} ({run.name}).")
        if run.dataset_fingerprint != first.dataset_fingerprint:
            raise ValueError(f"The runs mix datasets: {first.name} and {run.name} have different fingerprints.")
