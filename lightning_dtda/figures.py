"""Figures of attribution results (matplotlib: ``pip install "lightning-dtda[plot]"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_dtda.result import AttributionResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('Figures need matplotlib: pip install "lightning-dtda[plot]"') from err
    return plt


def plot_distributions(result: AttributionResult, query: int, examples: Sequence[int]) -> "Figure":
    """Base versus predicted distribution of query ``query``'s measurement, one panel per example.

    Each panel shows the measurement of every seed before (left) and after removing the example
    (right, ``base + effect``), a line joining each seed's pair, and the mean and standard deviation
    of each side; the title gives the predicted mean and standard-deviation shifts.
    """
    plt = _pyplot()
    mean, std = result.mean_shift()[query], result.std_shift()[query]
    fig, axes = plt.subplots(1, len(examples), figsize=(2.4 * len(examples), 3.2), sharey=True, squeeze=False)
    base = result.measurements[:, query]
    for ax, n in zip(axes[0], examples):
        pushed = base + result.effects[:, query, n]
        for b, p in zip(base.tolist(), pushed.tolist()):
            ax.plot([0, 1], [b, p], color="0.75", lw=0.8, zorder=1)
        for x, values, colour in ((0, base, "tab:blue"), (1, pushed, "tab:orange")):
            ax.scatter([x] * len(values), values.tolist(), color=colour, s=14, zorder=2)
            ax.errorbar(x + 0.12, values.mean().item(), yerr=values.std().item() if len(values) > 1 else 0,
                        fmt="o", color="black", capsize=3, zorder=3)
        ax.set_xticks([0, 1], ["base", "removed"])
        ax.set_xlim(-0.4, 1.5)
        ax.set_title(f"example {n}\nΔmean {mean[n]:+.2g}, Δstd {std[n]:+.2g}", fontsize=8)
    axes[0][0].set_ylabel(f"measurement of query {query}")
    fig.suptitle(f"Predicted distribution over {result.num_seeds} seeds after removal", fontsize=9)
    fig.tight_layout()
    return fig
