"""Distributional training data attribution for PyTorch Lightning."""

from lightning_dtda.hooks import Hooks, MissingHookError
from lightning_dtda.influence import Attributor
from lightning_dtda.recorder import TrajectoryRecorder
from lightning_dtda.reporting import log_result
from lightning_dtda.result import AttributionResult
from lightning_dtda.callback import AttributionCallback
from lightning_dtda.ensemble import train_seeds
from lightning_dtda.trajectory import Step, Trajectory, load_runs

__version__ = "0.1.0"

__all__ = [
    "AttributionCallback",
    "AttributionResult",
    "Attributor",
    "Hooks",
    "MissingHookError",
    "Step",
    "Trajectory",
    "TrajectoryRecorder",
    "load_runs",
    "log_result",
    "train_seeds",
]
