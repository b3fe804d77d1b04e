"""``Retraining``, a ground truth by coupled retraining as a record, and ``QuerySpearman``, the metric that scores
estimates against it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional import spearman_corrcoef

from lightning_dtda._io import load_tree, save_tree
from lightning_dtda.results import distribution
from lightning_dtda.results.result import AttributionResult

_RETRAINING_FORMAT = 2  # 2: a safetensors file; 1: torch.save (see migrate.convert)


@dataclass
class Retraining:
    """Measurements of coupled retraining under ``M`` per-example weightings.

    Attributes:
        weights: ``[M, N]`` loss weight of every training example in each weighting (1 = kept).
        base: ``[S, Q]`` each seed's measurement with every weight 1 (the recorded run, replayed).
        retrained: ``[S, Q, M]`` each seed's measurement under each weighting.
        runs: The run names, one per seed.
        rounding: ``[S, Q, M]`` how far each effect moves when its replays start one rounding unit away
            (``retrain`` measures it; ``None`` where not measured). See ``decided``.
    """

    weights: Tensor
    base: Tensor
    retrained: Tensor
    runs: list[str]
    rounding: Tensor | None = None

    @property
    def effects(self) -> Tensor:
        """True per-seed effects ``[S, Q, M]``: retrained minus base measurement."""
        return self.retrained - self.base.unsqueeze(-1)

    @property
    def decided(self) -> Tensor:
        """``[S, Q, M]``, ``True`` for effects that rounding decides rather than the weighting: they move by over
        1% of their query's largest effect (and by over 1e-5 of its measurement, far above float32's own noise)
        when the replays start one rounding unit away (the run passes near ties, at max-pool or ReLU kinks).
        A lower bound: other rounding moves others too (see the distributions guide).

        Raises:
            ValueError: Where ``rounding`` was not measured (a file saved by an earlier version): nothing is known.
        """
        if self.rounding is None:
            raise ValueError(
                "This ground truth has no rounding measurement (saved by an earlier version), so which of its effects "
                "rounding decides is unknown. Run retrain again to measure it."
            )
        scale = self.effects.abs().amax(-1, keepdim=True)
        return (self.rounding > 0.01 * scale) & (self.rounding > 1e-5 * self.base.abs().unsqueeze(-1))

    def statistic(self, name: str) -> Tensor:
        """The true shift of a distributional statistic (see ``distribution.STATISTICS``), ``[Q, M]``."""
        return distribution.statistic(name)(self.base, self.effects)

    def predicted_effects(self, result: AttributionResult) -> Tensor:
        """First-order prediction of each weighting from per-example effects, ``[S', Q, M]``.

        Lowering example ``n``'s weight from 1 to ``w`` is predicted to change the measurement by
        ``(1 - w)`` times its removal effect; a weighting's effect is the sum over examples.
        """
        removed = (1 - self.weights).to(result.effects.dtype)
        return result.effects @ removed.T

    def table(self, result: AttributionResult, statistic: str) -> tuple[Tensor, Tensor]:
        """``(predicted [Q, M], actual [Q, M])`` of ``statistic``, ready for ``QuerySpearman``."""
        fn = distribution.statistic(statistic)
        return fn(result.measurements, self.predicted_effects(result)), self.statistic(statistic)

    def split_half(self, statistic: str) -> float:
        """Agreement of the statistic between the first and second half of the seeds (the ceiling
        any estimator can reach against this ground truth), as a ``QuerySpearman``. Needs at least four seeds.

        Raises:
            ValueError: With fewer than four seeds.
        """
        half = len(self.runs) // 2
        if half < 2:
            # One seed against one is not a ceiling, and a variance over one seed does not exist.
            raise ValueError(
                f"split_half needs at least four seeds (two per half), got {len(self.runs)}. Retrain more seeds."
            )
        fn = distribution.statistic(statistic)
        metric = QuerySpearman()
        metric.update(
            fn(self.base[:half], self.effects[:half]), fn(self.base[half : 2 * half], self.effects[half : 2 * half])
        )
        return metric.compute().item()

    def save(self, path: str | Path) -> None:
        """Write atomically, as a safetensors file (tensors ``weights``, ``base``, ``retrained`` and, where
        measured, ``rounding``; the run names in its metadata entry ``"lightning_dtda"``)."""
        save_tree(
            {
                "format": _RETRAINING_FORMAT,
                "weights": self.weights,
                "base": self.base,
                "retrained": self.retrained,
                "runs": self.runs,
                **({} if self.rounding is None else {"rounding": self.rounding}),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> "Retraining":
        """Read a file written by ``save``; a truncated or foreign file raises ``ValueError``."""
        payload = load_tree(path)
        if payload.get("format") != _RETRAINING_FORMAT:
            raise ValueError(f"{path} is not a Retraining file (format {_RETRAINING_FORMAT}).")
        return cls(payload["weights"], payload["base"], payload["retrained"], payload["runs"], payload.get("rounding"))


class QuerySpearman(Metric):
    """Spearman correlation across columns, averaged over queries (rows).

    ``update(preds [Q, M], target [Q, M])``; each row is ranked with average ranks for ties (torchmetrics'
    ``spearman_corrcoef``, as ``scipy.stats.spearmanr``; torchmetrics adds 1e-6 to the denominator, a
    relative difference of ``1.2e-5 / (M**2 - 1)``), and rows where either side is constant are skipped.
    Distributed: the per-query sums and counts are summed across processes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape or preds.ndim != 2:
            raise ValueError(
                f"preds and target must both be [queries, columns], got {tuple(preds.shape)} and {tuple(target.shape)}."
            )
        preds, target = preds.to(torch.float64), target.to(torch.float64)
        valid = (preds.std(-1) > 0) & (target.std(-1) > 0)
        if valid.any():
            # torchmetrics correlates columns (one per output), so each query becomes a column.
            rho = spearman_corrcoef(preds[valid].T, target[valid].T).reshape(-1)
            self.total += rho.sum()
            self.count += valid.sum()

    def compute(self) -> Tensor:
        return self.total / self.count
