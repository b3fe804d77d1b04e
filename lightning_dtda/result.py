"""``AttributionResult``: per-seed removal effects and what they were computed from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_dtda._io import load_torch, save_json, save_torch

_RESULT_FORMAT = 1


@dataclass
class AttributionResult:
    """Predicted effects of removing each training example, for every recorded seed.

    Sign convention: ``effects[s, q, n]`` is the predicted change of query ``q``'s measurement in
    seed ``s``'s run when training example ``n`` is removed (new minus old). With the default
    measurement, the query loss, a positive effect marks a *helpful* example (removing it raises the
    loss) and a negative one a *harmful* example.

    Attributes:
        effects: ``[seeds, queries, train]``.
        measurements: ``[seeds, queries]``, each seed's measurement before removal.
        runs: Names of the run folders, one per seed, in the order of the first dimension.
        settings: How the result was made (method, curvature, damping per run, versions, ...).
    """

    effects: Tensor
    measurements: Tensor
    runs: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s, q, _ = self.effects.shape
        if tuple(self.measurements.shape) != (s, q) or len(self.runs) != s:
            raise ValueError(
                f"effects {tuple(self.effects.shape)}, measurements {tuple(self.measurements.shape)} and "
                f"{len(self.runs)} runs do not agree on [seeds, queries]."
            )

    @property
    def num_seeds(self) -> int:
        return self.effects.shape[0]

    @property
    def num_queries(self) -> int:
        return self.effects.shape[1]

    @property
    def num_train(self) -> int:
        return self.effects.shape[2]

    def mean_shift(self) -> Tensor:
        """Predicted change of the mean measurement over seeds when each example is removed, ``[queries, train]``."""
        return self.effects.mean(0)

    def top_k(self, query: int, k: int = 10, largest: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` training examples whose removal most raises (``largest``) or lowers query ``query``'s mean.

        Returns:
            ``(mean shifts [k], training indices [k])``, most extreme first.
        """
        return torch.topk(self.mean_shift()[query], min(k, self.num_train), largest=largest)

    def save(self, path: str | Path) -> None:
        """Write the result to ``path`` (atomically) and its settings to ``path`` with suffix ``.json``."""
        path = Path(path)
        payload = {
            "format": _RESULT_FORMAT,
            "effects": self.effects.cpu(),
            "measurements": self.measurements.cpu(),
            "runs": list(self.runs),
            "settings": self.settings,
        }
        save_torch(payload, path)
        save_json({"runs": list(self.runs), "shape": list(self.effects.shape), **self.settings}, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: str | Path) -> "AttributionResult":
        """Read a result written by :meth:`save`; a truncated or foreign file raises ``ValueError``."""
        payload = load_torch(path)
        if not isinstance(payload, dict) or payload.get("format") != _RESULT_FORMAT:
            raise ValueError(f"{path} is not an AttributionResult file (format {_RESULT_FORMAT}).")
        return cls(payload["effects"], payload["measurements"], payload["runs"], payload["settings"])
