"""How a measurement's distribution over seeds moves, from coupled samples.

Every function takes the base samples ``base [S, Q]`` (seed ``s``'s measurement of query ``q``) and
per-seed removal effects ``effects [S, Q, K]`` (exact or predicted), and compares the base
distribution with the pushed one ``y = base + effects`` (the same seeds after removal, so the two
samples are coupled seed by seed). Each returns ``[Q, K]``: one number per query and example.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

STATISTICS = ("mean", "variance", "std", "wasserstein")

# Below this many seeds a bootstrap interval is said to be a rough range.
_FEW_SEEDS = 8


def _pushed(base: Tensor, effects: Tensor) -> tuple[Tensor, Tensor]:
    x = base.unsqueeze(-1).expand_as(effects)
    return x, x + effects


def mean_shift(base: Tensor, effects: Tensor) -> Tensor:
    """``mean(y) - mean(x)``, which is the seed-averaged effect."""
    return effects.mean(0)


def variance_shift(base: Tensor, effects: Tensor) -> Tensor:
    """``var(y) - var(x)`` (sample variances over seeds) ``= 2 cov(x, effect) + var(effect)``."""
    x, y = _pushed(base, effects)
    return y.var(0) - x.var(0)


def std_shift(base: Tensor, effects: Tensor) -> Tensor:
    """``std(y) - std(x)``: the spread's change in the measurement's own units."""
    x, y = _pushed(base, effects)
    return y.std(0) - x.std(0)


def wasserstein(base: Tensor, effects: Tensor) -> Tensor:
    """The 2-Wasserstein distance between the base and pushed empirical distributions (scalar measurement).

    For two samples of equal size on the line, the optimal coupling pairs them in sorted order.
    """
    x, y = _pushed(base, effects)
    return (y.sort(0).values - x.sort(0).values).pow(2).mean(0).sqrt()


def quantile_shift(base: Tensor, effects: Tensor, q: float) -> Tensor:
    """``quantile(y, q) - quantile(x, q)`` with linear interpolation between seeds."""
    x, y = _pushed(base, effects)
    return torch.quantile(y, q, dim=0) - torch.quantile(x, q, dim=0)


def statistic(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The function for ``name`` in ``STATISTICS``."""
    functions = {"mean": mean_shift, "variance": variance_shift, "std": std_shift, "wasserstein": wasserstein}
    if name not in functions:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}.")
    return functions[name]


def bootstrap_interval(
    fn: Callable[[Tensor, Tensor], Tensor],
    base: Tensor,
    effects: Tensor,
    level: float = 0.9,
    num_resamples: int = 1000,
    seed: int = 0,
    chunk: int = 50,
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of ``fn(base, effects)`` over seeds, ``([Q, K], [Q, K])``.

    Seeds are resampled with replacement as pairs (``base[s]`` with ``effects[s]``), which keeps
    each seed's coupling between its base and pushed measurement.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    num_seeds = base.shape[0]
    if num_seeds < 3:
        # Resampling two seeds spans their own two values: no level's interval, presented as one.
        raise ValueError(
            f"A bootstrap over seeds needs at least three seeds, got {num_seeds}: with two, any interval is just the "
            "two seeds' own values. Record more seeds."
        )
    if num_seeds < _FEW_SEEDS:
        warnings.warn(
            f"A percentile bootstrap over {num_seeds} seeds covers less than its nominal {level:.0%}: it cannot reach "
            f"beyond the seeds' own values. Read it as a rough range; {_FEW_SEEDS} or more seeds make it an interval.",
            stacklevel=3,
        )
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(num_seeds, (num_resamples, num_seeds), generator=generator)
    values = torch.cat(
        [
            torch.vmap(lambda i: fn(base[i], effects[i]))(draws[j : j + chunk].to(base.device))
            for j in range(0, num_resamples, chunk)
        ]
    )
    alpha = (1 - level) / 2
    ordered = values.sort(0).values
    # torch.quantile refuses inputs over 2**24 elements; interpolate between order statistics instead.
    bounds = []
    for q in (alpha, 1 - alpha):
        position = q * (num_resamples - 1)
        lower = int(position)
        upper = min(lower + 1, num_resamples - 1)
        bounds.append(torch.lerp(ordered[lower], ordered[upper], position - lower))
    return bounds[0], bounds[1]
