"""Distributional training data attribution for PyTorch Lightning.

What is listed in ``__all__`` is the public API. The subpackages hold the pipeline by stage, each
importing only the stages below it (``runs`` < ``record``, ``model`` < ``curvature``, ``replay`` <
``estimators`` < ``attributor``; the layers are declared in ``pyproject.toml`` and checked in CI).
They are importable for the curious but internal: they may change between releases without notice.
"""

from lightning_dtda import errors
from lightning_dtda._version import __version__
from lightning_dtda.attributor import Attributor
from lightning_dtda.callback import AttributionCallback
from lightning_dtda.errors import (
    CorruptFileError,
    DatasetMismatchError,
    MissingHookError,
    ReplayMismatchError,
    UnfinishedRunError,
    UnsupportedLayerError,
    UnsupportedTrainingError,
)
from lightning_dtda.estimators import Estimator, Influence, Segmented, Unrolled
from lightning_dtda.evaluation import leave_one_out_weights, random_subset_weights, retrain
from lightning_dtda.hooks import Hooks
from lightning_dtda.migrate import convert
from lightning_dtda.record.recorder import TrajectoryRecorder
from lightning_dtda.record.seeds import train_seeds
from lightning_dtda.reporting import figures
from lightning_dtda.reporting.loggers import log_result
from lightning_dtda.results.result import AttributionResult, SelfInfluence
from lightning_dtda.results.retraining import QuerySpearman, Retraining
from lightning_dtda.runs.augmentation import ReplayableAugmentation
from lightning_dtda.runs.format import Step
from lightning_dtda.runs.trajectory import Trajectory, load_runs

__all__ = [
    "__version__",
    "AttributionCallback",
    "AttributionResult",
    "Attributor",
    "CorruptFileError",
    "DatasetMismatchError",
    "Estimator",
    "Hooks",
    "Influence",
    "MissingHookError",
    "QuerySpearman",
    "ReplayMismatchError",
    "ReplayableAugmentation",
    "Retraining",
    "Segmented",
    "SelfInfluence",
    "Step",
    "Trajectory",
    "TrajectoryRecorder",
    "UnfinishedRunError",
    "UnsupportedLayerError",
    "UnsupportedTrainingError",
    "Unrolled",
    "convert",
    "errors",
    "figures",
    "leave_one_out_weights",
    "load_runs",
    "log_result",
    "random_subset_weights",
    "retrain",
    "train_seeds",
]
