"""Estimators of per-seed removal effects: one small frozen dataclass each, holding only its settings."""

from lightning_dtda.estimators.base import Estimator, RunContext
from lightning_dtda.estimators.influence import Influence
from lightning_dtda.estimators.segmented import Segmented
from lightning_dtda.estimators.unrolled import Unrolled

__all__ = ["Estimator", "Influence", "RunContext", "Segmented", "Unrolled"]
