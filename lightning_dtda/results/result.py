"""``AttributionResult``: per-seed removal effects and what they were computed from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_dtda._io import load_tree, save_json, save_tree
from lightning_dtda.results import distribution

_RESULT_FORMAT = 2  # 2: a safetensors file; 1: torch.save (see migrate.convert)


# What Attributor.attribute adds to the estimator's settings: per run, and about the runs.
_RUN_SETTINGS = (
    "per_run",
    "seeds",
    "snapshot",
    "snapshot_steps",
    "run_status",
    "precision",
    "module",
    "dataset_fingerprint",
    "versions",
)


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

    def __repr__(self) -> str:
        estimator = {k: v for k, v in self.settings.items() if k not in _RUN_SETTINGS}
        return f"AttributionResult(effects [seeds, queries, train] = {list(self.effects.shape)}, runs={self.runs}, {estimator})"

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
        """Predicted change of the measurement's mean over seeds, ``[queries, train]`` (the seed-averaged effect)."""
        return distribution.mean_shift(self.measurements, self.effects)

    def variance_shift(self) -> Tensor:
        """Predicted change of the measurement's variance over seeds, ``[queries, train]``."""
        return distribution.variance_shift(self.measurements, self.effects)

    def std_shift(self) -> Tensor:
        """Predicted change of the measurement's standard deviation over seeds, ``[queries, train]``."""
        return distribution.std_shift(self.measurements, self.effects)

    def wasserstein(self) -> Tensor:
        """2-Wasserstein distance between the base and predicted distributions, ``[queries, train]`` (>= 0)."""
        return distribution.wasserstein(self.measurements, self.effects)

    def quantile_shift(self, q: float) -> Tensor:
        """Predicted change of the measurement's ``q``-quantile over seeds, ``[queries, train]``."""
        return distribution.quantile_shift(self.measurements, self.effects, q)

    def statistic(self, name: str) -> Tensor:
        """``mean_shift``, ``variance_shift``, ``std_shift`` or ``wasserstein`` by name
        (``"mean"``, ``"variance"``, ``"std"``, ``"wasserstein"``), ``[queries, train]``."""
        return distribution.statistic(name)(self.measurements, self.effects)

    def interval(
        self, statistic: str = "mean", level: float = 0.9, num_resamples: int = 1000, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval over seeds of a statistic, ``(low [queries, train], high [queries, train])``.

        Seeds are resampled in pairs (base measurement with its effects). Needs at least three seeds (with two,
        any interval is the two seeds' own values); below eight it warns that it covers less than ``level``.
        """
        return distribution.bootstrap_interval(
            distribution.statistic(statistic), self.measurements, self.effects, level, num_resamples, seed
        )

    def top_k(self, query: int, k: int = 10, largest: bool = True, statistic: str = "mean") -> tuple[Tensor, Tensor]:
        """The ``k`` training examples with the largest (or smallest) ``statistic`` for query ``query``.

        With the default ``statistic="mean"`` and a loss measurement, ``largest=True`` gives the most
        helpful examples (removal raises the loss) and ``largest=False`` the most harmful.

        Returns:
            ``(values [k], training indices [k])``, most extreme first.
        """
        return torch.topk(self.statistic(statistic)[query], min(k, self.num_train), largest=largest)

    def spread_wideners(self, query: int, k: int = 10) -> tuple[Tensor, Tensor]:
        """Examples whose removal moves the spread much more than the mean, for query ``query``.

        The score is ``|std shift| - |mean shift|``, both in the measurement's units: positive when
        removing the example changes how *reliably* the query is fitted across seeds more than how
        well it is fitted on average.

        Returns:
            ``(scores [k], training indices [k])``, highest score first.
        """
        score = self.std_shift()[query].abs() - self.mean_shift()[query].abs()
        return torch.topk(score, min(k, self.num_train))

    def save(self, path: str | Path) -> None:
        """Write the result to ``path`` (atomically) and its settings to ``path`` with suffix ``.json``.

        ``path`` is a safetensors file (name it ``*.safetensors``): tensors ``effects`` and
        ``measurements``; its metadata entry ``"lightning_dtda"`` holds ``format``, ``runs`` and
        ``settings`` as JSON. Open it without this package with ``safetensors.torch.load_file(path)``.

        Raises:
            TypeError: If ``settings`` holds something other than tensors, numbers, strings, lists or dicts.
        """
        path = Path(path)
        payload = {
            "format": _RESULT_FORMAT,
            "effects": self.effects,
            "measurements": self.measurements,
            "runs": list(self.runs),
            "settings": self.settings,
        }
        save_tree(payload, path)
        save_json(
            {"runs": list(self.runs), "shape": list(self.effects.shape), **self.settings}, path.with_suffix(".json")
        )

    @classmethod
    def load(cls, path: str | Path) -> "AttributionResult":
        """Read a result written by ``save``.

        Raises:
            ValueError: If the file is truncated, foreign, or a ``torch.save`` file of an earlier version
                (the message says how to convert it).
        """
        payload = load_tree(path)
        if payload.get("format") != _RESULT_FORMAT:
            raise ValueError(f"{path} is not an AttributionResult file (format {_RESULT_FORMAT}).")
        return cls(payload["effects"], payload["measurements"], payload["runs"], payload["settings"])


@dataclass
class SelfInfluence:
    """Each training example's predicted removal effect on its own training loss, for every recorded seed.

    Sign convention as everywhere: ``effects[s, n]`` is the predicted change of example ``n``'s training
    loss in seed ``s``'s run when ``n`` is *removed* (new minus old). Removing an example ``n`` from the
    objective ``(1/N) sum_i l_i`` moves the weights by ``(C + lambda I)^-1 g_n / N`` (``g_n`` its gradient),
    so its loss changes by ``g_n^T (C + lambda I)^-1 g_n / N >= 0``: the model fits the example less
    without it. Large values mark examples fitted only because they were trained on: mislabelled,
    atypical, duplicated-but-contradicted. The statistics below treat each example's own loss as its
    measurement: ``losses[:, n]`` are the base samples, ``losses[:, n] + effects[:, n]`` the pushed ones.

    Attributes:
        effects: ``[seeds, train]``.
        losses: ``[seeds, train]``, each example's training loss in each seed's final model.
        runs: Names of the run folders, one per seed.
        settings: How the result was made (estimator, damping per run, seeds, versions, ...).
    """

    effects: Tensor
    losses: Tensor
    runs: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.effects.ndim != 2 or self.losses.shape != self.effects.shape or len(self.runs) != self.effects.shape[0]:
            raise ValueError(
                f"effects {tuple(self.effects.shape)}, losses {tuple(self.losses.shape)} and {len(self.runs)} runs do not "
                "agree on [seeds, train]."
            )

    def __repr__(self) -> str:
        estimator = {k: v for k, v in self.settings.items() if k not in _RUN_SETTINGS}
        return f"SelfInfluence(effects [seeds, train] = {list(self.effects.shape)}, runs={self.runs}, {estimator})"

    @property
    def num_seeds(self) -> int:
        return self.effects.shape[0]

    @property
    def num_train(self) -> int:
        return self.effects.shape[1]

    def mean_shift(self) -> Tensor:
        """The seed-averaged self-influence, ``[train]``: what to rank by when looking for bad examples."""
        return self.effects.mean(0)

    def statistic(self, name: str) -> Tensor:
        """How removal moves each example's own-loss distribution over seeds, ``[train]``: ``"mean"``,
        ``"variance"``, ``"std"`` or ``"wasserstein"`` (see ``AttributionResult``)."""
        return distribution.statistic(name)(self.losses, self.effects.unsqueeze(-1)).squeeze(-1)

    def interval(
        self, statistic: str = "mean", level: float = 0.9, num_resamples: int = 1000, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval over seeds of a statistic, ``(low [train], high [train])``; needs three seeds (see ``AttributionResult.interval``)."""
        low, high = distribution.bootstrap_interval(
            distribution.statistic(statistic), self.losses, self.effects.unsqueeze(-1), level, num_resamples, seed
        )
        return low.squeeze(-1), high.squeeze(-1)

    def top_k(self, k: int = 10, statistic: str = "mean", largest: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` examples with the largest ``statistic``: by default the most self-influential, the first
        to inspect when cleaning data (``largest=False``: the least). Returns ``(values [k], training
        indices [k])``, in that order."""
        return torch.topk(self.statistic(statistic), min(k, self.num_train), largest=largest)
