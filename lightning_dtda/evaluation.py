"""Ground truth by coupled retraining, and the metrics that compare estimates with it.

Retraining replays each recorded Lightning run (same seed: same initialisation, same batch order,
same learning rates) with per-example loss weights, many weightings at once (see ``replay``):

- leave-one-out: example ``k``'s weight set to 0, one weighting per chosen example;
- random subsets (the linear datamodeling score): each weighting keeps a random half of the data.

Every comparison is a table ``(predicted [Q, M], actual [Q, M])`` over ``M`` weightings of a
distributional statistic, scored by :class:`QuerySpearman`: the Spearman correlation across the
``M`` columns, averaged over queries. For leave-one-out tables that is the Spearman of predicted
versus true shifts; for subset tables it is the LDS (``"mean"``) or a distributional LDS
(``"variance"``, ``"wasserstein"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric
from torchmetrics.functional import spearman_corrcoef
from tqdm.auto import tqdm

from lightning_dtda import distribution
from lightning_dtda._io import load_tree, save_tree
from lightning_dtda.hooks import Hooks
from lightning_dtda.replay import Replay, measure
from lightning_dtda.result import AttributionResult
from lightning_dtda.trajectory import Trajectory, check_poolable, instantiate, load_runs

_RETRAINING_FORMAT = 2  # 2: a safetensors file; 1: torch.save (see legacy.convert)


@dataclass
class Retraining:
    """Measurements of coupled retraining under ``M`` per-example weightings.

    Attributes:
        weights: ``[M, N]`` loss weight of every training example in each weighting (1 = kept).
        base: ``[S, Q]`` each seed's measurement with every weight 1 (the recorded run, replayed).
        retrained: ``[S, Q, M]`` each seed's measurement under each weighting.
        runs: The run names, one per seed.
    """

    weights: Tensor
    base: Tensor
    retrained: Tensor
    runs: list[str]

    @property
    def effects(self) -> Tensor:
        """True per-seed effects ``[S, Q, M]``: retrained minus base measurement."""
        return self.retrained - self.base.unsqueeze(-1)

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
        """``(predicted [Q, M], actual [Q, M])`` of ``statistic``, ready for :class:`QuerySpearman`."""
        fn = distribution.statistic(statistic)
        return fn(result.measurements, self.predicted_effects(result)), self.statistic(statistic)

    def split_half(self, statistic: str) -> float:
        """Agreement of the statistic between the first and second half of the seeds (the ceiling
        any estimator can reach against this ground truth), as a :class:`QuerySpearman`."""
        half = len(self.runs) // 2
        fn = distribution.statistic(statistic)
        metric = QuerySpearman()
        metric.update(fn(self.base[:half], self.effects[:half]), fn(self.base[half : 2 * half], self.effects[half : 2 * half]))
        return metric.compute().item()

    def save(self, path: str | Path) -> None:
        """Write atomically, as a safetensors file (tensors ``weights``, ``base``, ``retrained``; the run
        names in its metadata entry ``"lightning_dtda"``)."""
        save_tree({"format": _RETRAINING_FORMAT, "weights": self.weights, "base": self.base, "retrained": self.retrained, "runs": self.runs}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Retraining":
        """Read a file written by :meth:`save`; a truncated or foreign file raises ``ValueError``."""
        payload = load_tree(path)
        if payload.get("format") != _RETRAINING_FORMAT:
            raise ValueError(f"{path} is not a Retraining file (format {_RETRAINING_FORMAT}).")
        return cls(payload["weights"], payload["base"], payload["retrained"], payload["runs"])


def retrain(
    module: type | torch.nn.Module,
    runs: str | Path | Sequence[Trajectory],
    train_data: Dataset,
    query_data: Dataset,
    weights: Tensor,
    models_per_pass: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Retraining:
    """Replay every run under every weighting and measure the queries.

    Args:
        module: The LightningModule class or an instance (as for the Attributor).
        runs: A folder of runs or loaded trajectories; each is one seed.
        train_data: The training set in recorded index order.
        query_data: The queries to measure.
        weights: ``[M, N]`` per-example loss weights.
        models_per_pass: How many weightings one vectorised replay trains at once.
        device: Where to train.
        progress: Show progress bars.
    """
    runs = load_runs(runs) if isinstance(runs, (str, Path)) else list(runs)
    check_poolable(runs)
    runs[0].check_dataset(train_data)
    if weights.ndim != 2 or weights.shape[1] != runs[0].dataset_length:
        raise ValueError(f"weights must be [M, {runs[0].dataset_length}], got {tuple(weights.shape)}.")
    rows = torch.cat([torch.ones(1, weights.shape[1], dtype=weights.dtype), weights])  # row 0: the base run
    base, retrained = [], []
    for run in tqdm(runs, desc="retraining seeds", disable=not progress):
        model = instantiate(module, run, 0, device)
        hooks = Hooks(model)
        if hooks.default_train_loss:
            hooks.check_loss(move_data_to_device(next(iter(DataLoader(train_data, batch_size=2))), device))
        replayer = Replay(model, run, train_data)  # one per run: it checks the run and reads snapshot 0
        measured = torch.cat(
            [
                measure(model, replayer.final(rows[i : i + models_per_pass], progress), query_data)
                for i in range(0, len(rows), models_per_pass)
            ]
        ).cpu()
        base.append(measured[0])
        retrained.append(measured[1:].T)
    return Retraining(weights.cpu(), torch.stack(base), torch.stack(retrained), [run.name for run in runs])


def leave_one_out_weights(num_train: int, examples: Sequence[int] | Tensor) -> Tensor:
    """``[K, N]`` weightings that each remove one of ``examples``."""
    examples = torch.as_tensor(examples)
    weights = torch.ones(len(examples), num_train, dtype=torch.float64)
    weights[torch.arange(len(examples)), examples] = 0.0
    return weights


def random_subset_weights(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``[M, N]`` weightings that each keep a random ``fraction`` of the training set (weights 0 or 1)."""
    generator = torch.Generator().manual_seed(seed)
    keep = round(fraction * num_train)
    weights = torch.zeros(num_subsets, num_train, dtype=torch.float64)
    for m in range(num_subsets):
        weights[m, torch.randperm(num_train, generator=generator)[:keep]] = 1.0
    return weights


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
            raise ValueError(f"preds and target must both be [queries, columns], got {tuple(preds.shape)} and {tuple(target.shape)}.")
        preds, target = preds.to(torch.float64), target.to(torch.float64)
        valid = (preds.std(-1) > 0) & (target.std(-1) > 0)
        if valid.any():
            # torchmetrics correlates columns (one per output), so each query becomes a column.
            rho = spearman_corrcoef(preds[valid].T, target[valid].T).reshape(-1)
            self.total += rho.sum()
            self.count += valid.sum()

    def compute(self) -> Tensor:
        return self.total / self.count
