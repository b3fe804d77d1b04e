"""The on-disk format of a recorded run: typed records for ``manifest.json``, its snapshot entries and
the per-step block inside each snapshot. This module is the only place that knows the JSON keys and
the block's tensor layout; the recorder writes through it and every reader reads through it. It is
one file, over 400 lines, on purpose: one owner for the format, so that a change to it is seen whole.

A run folder holds ``manifest.json`` (a ``Manifest``) and ``snapshots/step_XXXXXXXX.safetensors``
files whose content is a ``SnapshotContent`` (see ``SnapshotContent.to_tree`` for the layout).
Runs of format 2 (``.snapshot`` flat archives, see ``runs.archive``) read unchanged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_dtda._io import decode_file, read_checked, save_tree
from lightning_dtda.errors import CorruptFileError
from lightning_dtda.runs.archive import ARCHIVE_MAGIC, PickledEntryError, decode_archive

MANIFEST = "manifest.json"
# The optimizers whose step is modelled (replay, learning-rate time), by exact class path: a subclass or
# another class of the same name (``torch.optim.ASGD`` ends in "SGD") is none of them.
OPTIMIZERS = {"torch.optim.sgd.SGD": "SGD", "torch.optim.adam.Adam": "Adam", "torch.optim.adamw.AdamW": "AdamW"}


def same_class(cls: type, recorded: str) -> bool:
    """Whether ``cls`` may stand for the class a run recorded as ``recorded``: it has the same qualified name.

    The module part is not compared: a class defined in the script that trained is recorded as
    ``__main__.Net`` and imported elsewhere as ``train.Net``, and code moves between modules. The
    hyperparameters and weights then decide (see ``instantiate``).
    """
    return recorded.endswith("." + cls.__qualname__)


def optimizer_name(optimizer: Any) -> str | None:
    """``"SGD"``, ``"Adam"`` or ``"AdamW"`` for exactly those torch optimizers (see ``OPTIMIZERS``), else ``None``."""
    return OPTIMIZERS.get(f"{type(optimizer).__module__}.{type(optimizer).__qualname__}")


FORMAT = 3  # 3: snapshots are safetensors files; 2: flat archives (see runs.archive); 1: torch.save files
READABLE_FORMATS = (2, 3)  # the manifest's layout is the same in both; each snapshot file says which it is


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
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def comparable(value: Any) -> Any:
    """A ``jsonable`` value with the memory addresses in its reprs left out (``<function relu at 0x7f..>``): the
    same object repr'd in two processes compares equal."""
    if isinstance(value, str):
        return _ADDRESS.sub("", value)
    if isinstance(value, Mapping):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


@dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot as the manifest lists it: its file (relative to the run folder), optimizer step,
    epoch and the SHA-256 of the file's bytes; for Adam and AdamW, ``step_scale``: the median over the
    trainable parameters' entries of Adam's per-entry step multiplier ``1 / (sqrt(v_hat) + eps)`` at
    that step (``None`` for other optimizers, step 0, and runs recorded before 0.3)."""

    file: str
    step: int
    epoch: int
    sha256: str
    step_scale: float | None = None

    def to_json(self) -> dict[str, Any]:
        entry = {"file": self.file, "step": self.step, "epoch": self.epoch, "sha256": self.sha256}
        return entry if self.step_scale is None else {**entry, "step_scale": self.step_scale}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SnapshotEntry":
        return cls(data["file"], int(data["step"]), int(data["epoch"]), data["sha256"], data.get("step_scale"))


@dataclass(frozen=True)
class RecordingProcess:
    """The process that records a run, so a reader can tell a run in progress from an abandoned one."""

    host: str
    pid: int

    @classmethod
    def this_process(cls) -> "RecordingProcess":
        return cls(socket.gethostname(), os.getpid())

    def is_alive(self) -> bool | None:
        """Whether the writing process still runs; ``None`` when it ran on another host (unknowable)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, owned by someone else
            return True
        return True


def dropout_rates(module: Any) -> dict[str, float]:
    """The dropout probability of each dropout layer and attention by name (``nn.MultiheadAttention`` keeps its
    own, which its ``repr`` does not show): what a replay must draw as training drew."""
    return {
        name: float(m.dropout if isinstance(m, torch.nn.MultiheadAttention) else m.p)
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.MultiheadAttention, torch.nn.modules.dropout._DropoutNd))
    }


def module_fingerprint(module: Any) -> dict[str, str]:
    """Digests of what tells a module's code apart when its class name and weights fit: ``"structure"``,
    of its ``repr`` (its layers and their settings: a ``Tanh`` where a ``ReLU`` was), and ``"source"``,
    of its class's source code, when Python can find it (a ``forward`` that changed); and ``"dropout"``, its
    ``dropout_rates`` as JSON, which a replay checks (not in runs recorded by earlier versions)."""

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    fingerprint = {"structure": digest(repr(module)), "dropout": json.dumps(dropout_rates(module), sort_keys=True)}
    try:
        fingerprint["source"] = digest(inspect.getsource(type(module)))
    except (OSError, TypeError):  # defined interactively, or a built-in
        pass
    return fingerprint


def _json_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of ``data`` as canonical JSON (sorted keys, no spaces): the same for the same content however
    the file is laid out."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a run folder's ``manifest.json`` says about the run.

    Attributes:
        module_class: The LightningModule's import path, ``module.QualName``.
        hparams: Its hyperparameters (``self.hparams``), JSON-able.
        module_fingerprint: Digests of its structure and class source (see ``module_fingerprint``;
            ``None`` for runs recorded before 0.3).
        seed: The run's seed, or ``None``.
        dataset_length: Training set size ``N``.
        dataset_fingerprint: See ``data.fingerprint_dataset``.
        optimizer_class: The optimizer's import path.
        param_groups: Per parameter group, its settings and ``param_names``.
        schedulers: Per scheduler: ``class``, ``interval``, ``frequency``, ``cycle_momentum``.
        gradient_clipping: ``{"value": Trainer's gradient_clip_val, "algorithm": "norm" | "value", "custom":
            whether the module overrides configure_gradient_clipping}``; ``None`` for runs recorded before 0.2.
        snapshots: The snapshots written so far, in step order.
        complete: Whether training ended and the final snapshot is listed.
        stopped: Why training stopped early (the exception), if the recorder saw it stop.
        best_step: The step of the snapshot holding ``ModelCheckpoint``'s best checkpoint (``None``: no
            checkpoint was saved, or the run was recorded before 0.3).
        writer: The recording process (``None`` for runs recorded before 0.2).
        augmentation: ``"replayable"``: the training set was a ``ReplayableAugmentation``; ``"random"``: it drew
            random numbers when read, unwrapped (its views are lost); ``None``: neither (or recorded before 0.3).
        early_stopping: The Trainer's ``EarlyStopping`` callbacks, e.g. ``("EarlyStopping(monitor='val_loss',
            patience=3)",)``: the run's length depended on a metric a removal can change. Empty without one (and
            for runs recorded by earlier versions, which did not look).
        weight_averaging: The class names of the Trainer's weight-averaging callbacks (``StochasticWeightAveraging``,
            ``WeightAveraging``, ``EMAWeightAveraging``): the model ``fit`` left is an average, not the weights
            the snapshots hold, so nothing attributes the run. Empty without one (and for earlier versions' runs).
        unreplayable_callbacks: The class names of the Trainer's callbacks that change training where no replay
            follows (``GradientAccumulationScheduler``: the accumulation; ``BaseFinetuning``: the trainable
            parameters; ``ModelPruning``: the weights). Empty without one (and for earlier versions' runs).
        format: The run format the manifest was written in (see ``FORMAT``).
    """

    versions: dict[str, str]
    module_class: str
    hparams: dict[str, Any]
    seed: int | None
    dataset_length: int
    dataset_fingerprint: str
    optimizer_class: str
    param_groups: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    batch_size: int
    drop_last: bool
    batches_per_epoch: int | float
    accumulate_grad_batches: int
    world_size: int
    precision: str
    max_epochs: int | None
    max_steps: int
    gradient_clipping: dict[str, Any] | None = None
    snapshots: tuple[SnapshotEntry, ...] = ()
    complete: bool = False
    stopped: str | None = None
    writer: RecordingProcess | None = None
    format: int = field(default=FORMAT)
    module_fingerprint: dict[str, str] | None = None
    best_step: int | None = None
    augmentation: Literal["replayable", "random"] | None = None
    early_stopping: tuple[str, ...] = ()
    weight_averaging: tuple[str, ...] = ()
    unreplayable_callbacks: tuple[str, ...] = ()

    def with_snapshots(
        self, snapshots: Sequence[SnapshotEntry], complete: bool, stopped: str | None = None
    ) -> "Manifest":
        return replace(self, snapshots=tuple(snapshots), complete=complete, stopped=stopped)

    @property
    def optimizer(self) -> str | None:
        """``"SGD"``, ``"Adam"`` or ``"AdamW"`` for exactly those torch optimizers (see ``OPTIMIZERS``), else ``None``."""
        return OPTIMIZERS.get(self.optimizer_class)

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The dtype Lightning's precision plugin cast floating-point inputs to (``"64-true"``: float64;
        ``"16-true"``, ``"bf16-true"``: half), or ``None`` where it passed them as they are."""
        return {
            "64-true": torch.float64,
            "64": torch.float64,
            "16-true": torch.float16,
            "bf16-true": torch.bfloat16,
        }.get(self.precision)

    @property
    def optimizer_name(self) -> str:
        """The optimizer's class name, for messages."""
        return self.optimizer_class.rpartition(".")[2]

    def to_json(self) -> dict[str, Any]:
        # The layout of format 2 as the first recorder wrote it, so earlier runs read unchanged, and a
        # checksum of the rest (since 0.3), so an altered manifest is refused rather than believed.
        data = {
            "format": self.format,
            "versions": self.versions,
            "module": {"class": self.module_class, "hparams": self.hparams}
            | ({} if self.module_fingerprint is None else {"fingerprint": self.module_fingerprint}),
            "seed": self.seed,
            "dataset": {"length": self.dataset_length, "fingerprint": self.dataset_fingerprint},
            "optimizer": {"class": self.optimizer_class, "param_groups": self.param_groups},
            "schedulers": self.schedulers,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "batches_per_epoch": self.batches_per_epoch,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "world_size": self.world_size,
            "precision": self.precision,
            "max_epochs": self.max_epochs,
            "max_steps": self.max_steps,
            "gradient_clipping": self.gradient_clipping,
            "snapshots": [s.to_json() for s in self.snapshots],
            "complete": self.complete,
            "stopped": self.stopped,
            "writer": None if self.writer is None else {"host": self.writer.host, "pid": self.writer.pid},
        }
        if self.best_step is not None:
            data["best_step"] = self.best_step
        if self.augmentation is not None:
            data["augmentation"] = self.augmentation
        if self.early_stopping:
            data["early_stopping"] = list(self.early_stopping)
        if self.weight_averaging:
            data["weight_averaging"] = list(self.weight_averaging)
        if self.unreplayable_callbacks:
            data["unreplayable_callbacks"] = list(self.unreplayable_callbacks)
        return {**data, "sha256": _json_digest(data)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Manifest":
        """Read a manifest; raises ``ValueError`` for another format, a missing key, or content that does
        not match its checksum (manifests written before 0.3 have none)."""
        if "sha256" in data:
            data = dict(data)
            if data.pop("sha256") != _json_digest(data):
                raise ValueError("its content does not match its checksum: it was altered after it was written")
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(
                f"format {data.get('format')!r}, but this version of lightning-dtda reads formats {READABLE_FORMATS}. "
                "Read it with the version that recorded it, or record the run again with this one."
            )
        try:
            writer = data.get("writer")
            return cls(
                versions=dict(data["versions"]),
                module_class=data["module"]["class"],
                hparams=dict(data["module"]["hparams"]),
                seed=data["seed"],
                dataset_length=int(data["dataset"]["length"]),
                dataset_fingerprint=data["dataset"]["fingerprint"],
                optimizer_class=data["optimizer"]["class"],
                param_groups=list(data["optimizer"]["param_groups"]),
                schedulers=list(data["schedulers"]),
                batch_size=data["batch_size"],
                drop_last=bool(data["drop_last"]),
                batches_per_epoch=data["batches_per_epoch"],
                accumulate_grad_batches=int(data["accumulate_grad_batches"]),
                world_size=int(data["world_size"]),
                precision=data["precision"],
                max_epochs=data["max_epochs"],
                max_steps=data["max_steps"],
                gradient_clipping=data.get("gradient_clipping"),
                snapshots=tuple(SnapshotEntry.from_json(s) for s in data["snapshots"]),
                complete=bool(data["complete"]),
                stopped=data.get("stopped"),
                best_step=data.get("best_step"),
                augmentation=data.get("augmentation"),
                early_stopping=tuple(data.get("early_stopping", ())),
                weight_averaging=tuple(data.get("weight_averaging", ())),
                unreplayable_callbacks=tuple(data.get("unreplayable_callbacks", ())),
                writer=None if writer is None else RecordingProcess(writer["host"], int(writer["pid"])),
                format=int(data["format"]),
                module_fingerprint=data["module"].get("fingerprint"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"the manifest lacks or garbles the entry {err}; it was not written by TrajectoryRecorder."
            ) from err


# Optimizer settings that schedulers change besides the learning rate (OneCycleLR's cycle_momentum,
# user schedules): recorded per step and group, as learning rates are.
SCHEDULED = ("momentum", "beta1", "beta2")


def scheduled_settings(group: Mapping[str, Any]) -> dict[str, float]:
    """The ``SCHEDULED`` settings an optimizer parameter group has (``betas`` split in two)."""
    found = {"momentum": group["momentum"]} if "momentum" in group else {}
    if "betas" in group:
        found["beta1"], found["beta2"] = group["betas"]
    return {k: float(v) for k, v in found.items()}


# The random-number generators whose state the recorder keeps, for each micro-batch whose training
# step drew from them (dropout, any random op in the forward): the replay restores them to draw the
# same numbers. ``cuda`` is the generator of the module's CUDA device.
GENERATORS = ("cpu", "cuda")


@dataclass(frozen=True)
class Step:
    """One optimizer step: the dataset indices of each of its micro-batches, its learning rates, the
    other scheduled settings it used (``{"momentum": per group}`` or ``{"beta1": ..., "beta2": ...}``;
    empty for runs recorded before 0.2), and per micro-batch the state, at its start, of each generator
    (see ``GENERATORS``) its training step drew random numbers from (``None`` for runs recorded
    before 0.3, which did not record them). ``skipped``: the optimizer step did not happen (a 16-mixed
    run's gradient scaler found inf/NaN gradients); the forward did (batch norm statistics, random draws).
    ``losses``: each micro-batch's training loss as ``training_step`` returned it (not divided by the
    accumulation), which a replay compares with its own to find where it leaves the run (``None`` for
    runs recorded before 0.3, under DDP or with manual optimization; NaN where no loss was returned).
    ``augmentation``: each micro-batch's augmentation key (see ``augmentation.ReplayableAugmentation``;
    ``None`` for a micro-batch read without one), or ``None`` when the run was not trained through one.

    With gradient accumulation over ``A`` micro-batches on ``W`` processes, Lightning divides each
    micro-batch's mean loss by ``A`` and DDP averages over the ranks, so the step's gradient is
    ``(1/(A W)) * sum over its micro-batches of their mean gradient`` (micro-batches in rank order).
    """

    micro_batches: tuple[Tensor, ...]
    lrs: tuple[float, ...]
    scheduled: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    rng: tuple[Mapping[str, Tensor], ...] | None = None
    skipped: bool = False
    losses: tuple[float, ...] | None = None
    augmentation: tuple[int | None, ...] | None = None


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the recorder collects it, before ``encode_steps`` packs a snapshot's steps.

    Attributes:
        micro_batches: Each micro-batch's dataset indices.
        groups: Per parameter group, ``{"lr": ..., **its SCHEDULED settings}``.
        rng: Per micro-batch, ``{generator: its state at the micro-batch's start}`` for the generators it drew from.
        skipped: The optimizer step did not happen (16-mixed's gradient scaler found inf/NaN gradients).
        losses: Per micro-batch, its training loss (see ``Step``; a float or a scalar tensor); empty when not recorded.
        augmentation: Per micro-batch, its augmentation key or ``None`` (see ``Step``); empty when not recorded.
    """

    micro_batches: Sequence[Sequence[int]]
    groups: Sequence[Mapping[str, float]]
    rng: Sequence[Mapping[str, Tensor]]
    skipped: bool
    losses: Sequence[float | Tensor] = ()
    augmentation: Sequence[int | None] = ()


def encode_steps(first: int, steps: Sequence[StepRecord], num_groups: int) -> dict[str, Any]:
    """The per-step block of a snapshot: steps ``first, first + 1, ...`` (see ``StepRecord``), as
    flat tensors. Random states are kept only for the micro-batches that drew random numbers
    (``rng[generator]``: their positions among the block's micro-batches and their states)."""
    micro = [m for step in steps for m in step.micro_batches]
    micro_rng = [r for step in steps for r in step.rng]

    def table(name: str) -> Tensor:
        return torch.tensor([[g[name] for g in step.groups] for step in steps], dtype=torch.float64).reshape(
            len(steps), num_groups
        )

    names = [n for n in SCHEDULED if steps and n in steps[0].groups[0]]
    rng = {}
    for generator in GENERATORS:
        positions = [k for k, r in enumerate(micro_rng) if generator in r]
        if positions:
            rng[generator] = {
                "positions": torch.tensor(positions, dtype=torch.long),
                "states": torch.stack([micro_rng[k][generator] for k in positions]),
            }
    block: dict[str, Any] = {}
    if steps and all(len(step.losses) == len(step.micro_batches) for step in steps):
        block["losses"] = torch.tensor([float(loss) for step in steps for loss in step.losses], dtype=torch.float64)
    keys = [k for step in steps for k in step.augmentation]
    if len(keys) == len(micro) and any(k is not None for k in keys):  # keys are 63-bit: -1 marks "none"
        block["augmentation"] = torch.tensor([-1 if k is None else k for k in keys], dtype=torch.long)
    return {
        "first": first,
        "indices": torch.tensor([i for m in micro for i in m], dtype=torch.long),
        "micro_batch_sizes": torch.tensor([len(m) for m in micro], dtype=torch.long),
        "micro_batches_per_step": torch.tensor([len(step.micro_batches) for step in steps], dtype=torch.long),
        "skipped": torch.tensor([k for k, step in enumerate(steps) if step.skipped], dtype=torch.long),
        "lrs": table("lr"),
        "scheduled": {name: table(name) for name in names},
        # A marker as well as the states: runs recorded before 0.3 have no "rng" entry at all.
        "rng": {"recorded": True, **rng},
        **block,
    }


def decode_steps(block: Mapping[str, Any]) -> tuple[int, list[Step]]:
    """Invert ``encode_steps``: ``(first step number, steps)``."""
    # A copy: views would keep the snapshot's whole buffer, weights included, alive as long as the
    # trajectory caches its steps (decoded tensors are views of the bytes read; see _io).
    micro = torch.split(block["indices"].clone(), block["micro_batch_sizes"].tolist())
    micro_rng: list[dict[str, Tensor]] | None = None
    if "rng" in block:
        micro_rng = [{} for _ in micro]
        for generator in GENERATORS:
            if generator in block["rng"]:
                for k, state in zip(block["rng"][generator]["positions"].tolist(), block["rng"][generator]["states"]):
                    # A copy: the generators' setters crash on a view into the archive's buffer.
                    micro_rng[k][generator] = state.clone()
    skipped = set(block["skipped"].tolist()) if "skipped" in block else set()
    losses = block["losses"].tolist() if "losses" in block else None
    keys = None if "augmentation" not in block else [None if k < 0 else k for k in block["augmentation"].tolist()]
    steps, start = [], 0
    for k, count in enumerate(block["micro_batches_per_step"].tolist()):
        scheduled = {name: tuple(values[k].tolist()) for name, values in block.get("scheduled", {}).items()}
        rng = None if micro_rng is None else tuple(micro_rng[start : start + count])
        step_losses = None if losses is None else tuple(losses[start : start + count])
        step_keys = None if keys is None else tuple(keys[start : start + count])
        lrs = tuple(block["lrs"][k].tolist())
        steps.append(
            Step(tuple(micro[start : start + count]), lrs, scheduled, rng, k in skipped, step_losses, step_keys)
        )
        start += count
    return int(block["first"]), steps


@dataclass(frozen=True)
class SnapshotContent:
    """What one snapshot file holds.

    On disk (format 3) a safetensors file: the tensors ``state_dict.<key>`` (the module's
    ``state_dict``), ``steps.<name>`` (the per-step block, e.g. ``steps.indices``, ``steps.lrs``,
    ``steps.rng.cpu.states``) and ``optimizer_state.state.<parameter>.<name>``; the header's metadata
    entry ``"lightning_dtda"`` holds the rest as JSON (``format``, ``step``, ``epoch``, ``lrs``,
    ``steps.first``, the optimizer's settings) with each tensor as ``{"__tensor__": its name}``.

    Attributes:
        step: The optimizer step the weights are at.
        epoch: The epoch it was taken in.
        state_dict: The module's ``state_dict`` (CPU tensors).
        lrs: The learning rate of every parameter group at that moment.
        step_block: The per-step block (see ``encode_steps``) for the steps since the previous snapshot.
        optimizer_state: The optimizer's ``state_dict``, if the recorder was asked to keep it (its
            tuples, such as Adam's ``betas``, read back as lists).
    """

    step: int
    epoch: int
    state_dict: dict[str, Tensor]
    lrs: list[float]
    step_block: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None

    def to_tree(self) -> dict[str, Any]:
        tree = {
            "format": FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "state_dict": self.state_dict,
            "lrs": self.lrs,
            "steps": self.step_block,
        }
        if self.optimizer_state is not None:
            tree["optimizer_state"] = self.optimizer_state
        return tree

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any]) -> "SnapshotContent":
        return cls(
            tree["step"], tree["epoch"], tree["state_dict"], tree["lrs"], tree["steps"], tree.get("optimizer_state")
        )

    def save(self, path: Path) -> str:
        """Write the snapshot to ``path`` atomically and return the SHA-256 of its bytes."""
        return save_tree(self.to_tree(), path, checksum=False)  # the manifest holds its checksum

    @classmethod
    def load(cls, path: Path, sha256: str) -> "SnapshotContent":
        """Read a snapshot file of format 3, or 2 (the file's first bytes tell which).

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If its bytes do not match ``sha256`` or cannot be decoded.
        """
        data = read_checked(path, sha256)
        if not data.startswith(ARCHIVE_MAGIC):
            return cls.from_tree(decode_file(path, data))
        try:
            return cls.from_tree(decode_archive(data))
        except PickledEntryError as err:
            raise ValueError(
                f'{path}: {err}. Convert the run once with `python -c "from lightning_dtda import convert; '
                f'convert({str(path.parent.parent)!r})"` (it reads that entry with torch.load(weights_only=True)).'
            ) from err
        except Exception as err:  # the checksum matched, so this is a file some other program wrote
            raise CorruptFileError(f"{path} is not a readable snapshot file: {err}") from err

    def decoded_steps(self) -> tuple[int, list[Step]]:
        return decode_steps(self.step_block)


def snapshot_file(step: int) -> str:
    """A snapshot's file name, relative to the run folder."""
    return f"snapshots/step_{step:08d}.safetensors"
