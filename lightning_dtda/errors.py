"""The errors lightning-dtda raises for a cause a caller may want to tell apart.

Each subclasses the built-in exception raised for that cause before these classes existed
(``ValueError``, or ``TypeError`` for a missing hook), so ``except ValueError`` keeps working.
Invalid arguments (a negative damping, an unknown curvature name) stay plain ``ValueError``s.
"""


class MissingHookError(TypeError):
    """A hook is needed because its default does not apply to this module or batch (the message shows
    the hook's signature to define on the LightningModule)."""


class DatasetMismatchError(ValueError):
    """The data given is not what a run was recorded on (another length, content or order), or the runs
    of an ensemble were recorded on different data."""


class UnfinishedRunError(ValueError):
    """A run has not finished (still training, killed, or recorded on another host), or has no snapshot
    to read yet. ``load_runs(path, unfinished=True)`` pools such runs at their latest snapshot."""


class ReplayMismatchError(ValueError):
    """Replaying a recorded run does not land on the weights it recorded: the replay is not that run,
    so effects computed through it (``Unrolled``, ``retrain``) would be another run's. ``gap``: the
    relative distance, ``step``: where (``None`` where not measured)."""

    def __init__(self, message: str, gap: float | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.gap, self.step = gap, step


class UnsupportedLayerError(ValueError):
    """A layer, or a layer option, that the chosen estimator or curvature cannot go through (a weight
    K-FAC has no block for, ``Embedding(max_norm=...)``, outputs K-FAC cannot factor)."""


class UnsupportedTrainingError(ValueError):
    """A training set-up that the chosen estimator does not model or cannot replay (an optimizer or
    optimizer setting without a functional twin, ``Segmented`` with EK-FAC on Adam, a custom gradient clipping)."""


class CorruptFileError(ValueError):
    """A file that is truncated, fails its checksum, or is not the kind of file it should be."""
