"""Writing one run's folder: choosing it, the manifest, the snapshots, and pruning on resume.

Only rank zero touches files; every method that decides something (the folder) is a collective,
called on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from lightning_dtda._io import load_json, save_json
from lightning_dtda.damping import adam_step_scale
from lightning_dtda.runs.format import (
    FORMAT,
    MANIFEST,
    Manifest,
    RecordingProcess,
    SnapshotContent,
    SnapshotEntry,
    StepRecord,
    encode_steps,
    snapshot_file,
)

T = TypeVar("T")


class RunWriter:
    """The files of one recorded run under ``dirpath``.

    Args:
        dirpath: The folder of runs.
        run_name: This run's folder name; ``None`` chooses ``seed_{seed}`` or the first free ``run_{k}``.
        save_optimizer_state: Also store the optimizer's ``state_dict`` in each snapshot.
    """

    def __init__(self, dirpath: Path, run_name: str | None, save_optimizer_state: bool) -> None:
        self.dirpath = dirpath
        self.run_name = run_name
        self.save_optimizer_state = save_optimizer_state
        self.run_dir: Path | None = None
        self.manifest: Manifest | None = None
        self.snapshots: list[SnapshotEntry] = []
        # Steps since the last snapshot.
        self.pending_steps: list[StepRecord] = []
        self.last_snapshot_step = -1
        self.complete = False
        self.stopped: str | None = None
        # Set when a file could not be written: recording stops, training goes on.
        self.failed: str | None = None

    @property
    def next_step(self) -> int:
        """The optimizer step the next ``add_step`` records."""
        return self.last_snapshot_step + len(self.pending_steps) + 1

    def _choose_run_dir(self, seed: int | None) -> Path | str:
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
            return (
                f"{run_dir} already holds a recorded run. Give this run another `run_name` or "
                "`dirpath`, delete the folder, or resume it with `trainer.fit(ckpt_path=...)`."
            )
        return run_dir

    def start(self, trainer: pl.Trainer, manifest: Manifest) -> None:
        """Choose the run folder on rank zero, share it with every rank, and write the manifest."""
        # Rank zero decides, like ModelCheckpoint's dirpath: ranks could see different folders otherwise.
        choice = trainer.strategy.broadcast(self._choose_run_dir(manifest.seed) if trainer.is_global_zero else None)
        if isinstance(choice, str):
            raise RuntimeError(choice)
        self.run_dir = Path(choice)
        self.manifest = manifest
        self.snapshots, self.pending_steps, self.complete, self.stopped = [], [], False, None
        self.flush()

    def resume(self, trainer: pl.Trainer) -> None:
        """Continue the run restored by ``load_state_dict`` at ``trainer.global_step``."""
        assert self.run_dir is not None
        if self.next_step - 1 != trainer.global_step:
            raise RuntimeError(
                f"The checkpoint's TrajectoryRecorder state ends at step {self.next_step - 1}, but training resumes at "
                f"step {trainer.global_step}; the checkpoint was not written by this recorder's run."
            )
        # A run recorded in an earlier format goes on in this one; readers tell each snapshot's by its bytes.
        # This process records it now: with the crashed one's id, readers would take it for abandoned.
        self.manifest = replace(
            Manifest.from_json(load_json(self.run_dir / MANIFEST)),
            format=FORMAT,
            writer=RecordingProcess.this_process(),
        )
        self.complete, self.stopped = False, None
        if trainer.is_global_zero:
            self.flush()
            # Snapshots written after the checkpoint belong to the abandoned continuation.
            kept = {entry.file for entry in self.snapshots}
            for path in (self.run_dir / "snapshots").glob("step_*"):
                if f"snapshots/{path.name}" not in kept:
                    path.unlink()

    def add_step(
        self,
        micro_batches: list[list[int]],
        settings: list[dict[str, float]],
        rng: list[dict[str, Tensor]],
        skipped: bool,
        losses: list[Tensor | float] | None = None,
        augmentation: list[int | None] | None = None,
    ) -> None:
        """Record one optimizer step (see ``StepRecord``)."""
        self.pending_steps.append(StepRecord(micro_batches, settings, rng, skipped, losses or (), augmentation or ()))

    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the module's weights at the current step, with the steps since the last snapshot."""
        step = trainer.global_step
        if step == self.last_snapshot_step:
            return
        if trainer.is_global_zero and self.failed is None:
            assert self.run_dir is not None
            optimizer = trainer.optimizers[0]
            content = SnapshotContent(
                step=step,
                epoch=trainer.current_epoch,
                state_dict={k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                lrs=[float(g["lr"]) for g in optimizer.param_groups],
                step_block=encode_steps(self.last_snapshot_step + 1, self.pending_steps, len(optimizer.param_groups)),
                optimizer_state=optimizer.state_dict() if self.save_optimizer_state else None,
            )
            name = snapshot_file(step)
            sha256 = self._write(lambda: content.save(self.run_dir / name))
            # The manifest is rewritten at checkpoints and at the end rather than here: one file write
            # per snapshot instead of two (file writes are a large share of the recorder's cost).
            if sha256 is not None:
                entry = SnapshotEntry(name, step, trainer.current_epoch, sha256, adam_step_scale(optimizer))
                self.snapshots.append(entry)
        self.pending_steps = []
        self.last_snapshot_step = step

    def mark_best(self, step: int | None) -> None:
        """Note that the snapshot at ``step`` holds ModelCheckpoint's best checkpoint (written with the
        manifest); ``None``: the best checkpoint has no snapshot (it was saved inside an accumulated step)."""
        if self.manifest is not None:
            self.manifest = replace(self.manifest, best_step=step)

    def finish(self) -> None:
        """Mark the run complete. Nothing un-marks it afterwards."""
        self.complete = True
        self.flush()

    def stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        """Note that training stopped early (``reason``: the exception), so readers know the run is
        abandoned, with a snapshot of the last completed step so nothing since the last one is lost."""
        if self.complete or self.manifest is None:
            return
        if self.next_step - 1 == trainer.global_step:  # else it raised between an optimizer step and its record
            self.snapshot(trainer, pl_module)
        self.stopped = reason
        self.flush()

    def flush(self) -> None:
        """Bring the manifest up to date with the snapshots written so far (rank zero writes)."""
        if self.manifest is None or self.run_dir is None or rank_zero_only.rank != 0 or self.failed is not None:
            return
        manifest = self.manifest.with_snapshots(self.snapshots, self.complete, self.stopped)
        self._write(lambda: save_json(manifest.to_json(), self.run_dir / MANIFEST))

    def _write(self, write: Callable[[], T]) -> T | None:
        """``write()``, or ``None`` once a file could not be written: attribution is an add-on, and a full
        disk, a quota, a lost permission or a vanished folder must not cost the user the training it
        records. The first failure warns, stops recording and marks the run stopped if the manifest can
        still be written, so it is never taken for finished."""
        if self.failed is not None:
            return None
        try:
            return write()
        except OSError as err:
            self.abandon(
                f"{type(err).__name__}: {err}",
                "A file could not be written: free the space (or fix the folder) and record the run again.",
            )
            return None

    def abandon(self, reason: str, fix: str) -> None:
        """Stop recording for ``reason`` and warn, saying the ``fix``; training goes on. The run is marked
        stopped where its manifest can still be written, so it is never attributed as finished."""
        if self.failed is not None:
            return
        self.failed = f"recording failed: {reason}"[:300]
        rank_zero_warn(
            f"TrajectoryRecorder stopped recording {self.run_dir}: {reason}. Training goes on without it; the run is "
            f"marked stopped where its manifest can still be written, so it is not attributed as finished. {fix}"
        )
        if self.manifest is not None and self.run_dir is not None and rank_zero_only.rank == 0:
            manifest = self.manifest.with_snapshots(self.snapshots, False, self.failed)
            with contextlib.suppress(OSError):
                save_json(manifest.to_json(), self.run_dir / MANIFEST)

    def state_dict(self) -> dict[str, Any]:
        return {
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "last_snapshot_step": self.last_snapshot_step,
            "steps": [
                {
                    "micro_batches": s.micro_batches,
                    "settings": s.groups,
                    "rng": s.rng,
                    "skipped": s.skipped,
                    "losses": [float(loss) for loss in s.losses],
                    "augmentation": list(s.augmentation),
                }
                for s in self.pending_steps
            ],
            "snapshots": [s.to_json() for s in self.snapshots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore from a checkpoint; ``True`` if it held a run to resume."""
        if state.get("run_dir") is None:
            return False
        self.run_dir = Path(state["run_dir"])
        self.last_snapshot_step = state["last_snapshot_step"]
        self.pending_steps = [
            StepRecord(
                s["micro_batches"],
                s["settings"] if "settings" in s else [{"lr": lr} for lr in s["lrs"]],
                s.get("rng", [{} for _ in s["micro_batches"]]),
                s.get("skipped", False),
                s.get("losses", ()),
                s.get("augmentation", ()),
            )
            for s in state["steps"]
        ]
        self.snapshots = [SnapshotEntry.from_json(s) for s in state["snapshots"]]
        return True


# Entries whose median gives Adam's step scale: a strided sample beyond this bounds the cost at large sizes.
