"""Distributional training data attribution for PyTorch Lightning.

What is listed in ``__all__`` is the public API. Modules named after what they hold (``curvature``,
``replay``, ``gradients``, ...) are importable for the curious but are internal: they may change
between releases without notice.
"""

from lightning_dtda.attributor import Attributor
from lightning_dtda.callback import AttributionCallback
from lightning_dtda.ensemble import train_seeds
from lightning_dtda.estimators import Estimator, Influence, Segmented, Unrolled
from lightning_dtda.evaluation import QuerySpearman, Retraining, retrain
from lightning_dtda.hooks import Hooks, MissingHookError
from lightning_dtda.recorder import TrajectoryRecorder
from lightning_dtda.reporting import log_result
from lightning_dtda.result import AttributionResult, SelfInfluence
from lightning_dtda.run_format import Step
from lightning_dtda.trajectory import Trajectory, load_runs

__version__ = "0.2.0"

__all__ = [
    "AttributionCallback",
    "AttributionResult",
    "Attributor",
    "Estimator",
    "Hooks",
    "Influence",
    "MissingHookError",
    "QuerySpearman",
    "Retraining",
    "Segmented",
    "SelfInfluence",
    "Step",
    "Trajectory",
    "TrajectoryRecorder",
    "Unrolled",
    "load_runs",
    "log_result",
    "retrain",
    "train_seeds",
]
