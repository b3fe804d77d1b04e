"""Distributional training data attribution for PyTorch Lightning."""

from lightning_dtda.recorder import TrajectoryRecorder
from lightning_dtda.trajectory import Step, Trajectory, load_runs

__version__ = "0.1.0"

__all__ = ["Step", "TrajectoryRecorder", "Trajectory", "load_runs"]
