"""Figures of attribution results (matplotlib: ``pip install "lightning-dtda[plot]"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from lightning_dtda.results.result import AttributionResult

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
            ax.errorbar(
                x + 0.12,
                values.mean().item(),
                yerr=values.std().item() if len(values) > 1 else 0,
                fmt="o",
                color="black",
                capsize=3,
                zorder=3,
            )
        ax.set_xticks([0, 1], ["base", "removed"])
        ax.set_xlim(-0.4, 1.5)
        ax.set_title(f"example {n}\nΔmean {mean[n]:+.2g}, Δstd {std[n]:+.2g}", fontsize=8)
    axes[0][0].set_ylabel(f"measurement of query {query}")
    fig.suptitle(f"Predicted distribution over {result.num_seeds} seeds after removal", fontsize=9)
    fig.tight_layout()
    return fig


def plot_shift_scatter(result: AttributionResult, query: int | None = None) -> "Figure":
    """Mean shift against standard-deviation shift of every training example (one query, or all pooled).

    Examples far from the vertical axis move the spread; those near the horizontal axis but far
    along it move the mean. Spread-wideners sit high above a small mean shift.
    """
    plt = _pyplot()
    mean, std = result.mean_shift(), result.std_shift()
    if query is not None:
        mean, std = mean[query : query + 1], std[query : query + 1]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.scatter(mean.flatten().tolist(), std.flatten().tolist(), s=6, alpha=0.5)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_xlabel("mean shift on removal")
    ax.set_ylabel("std shift on removal")
    ax.set_title(
        f"{'query ' + str(query) if query is not None else 'all queries'}, {result.num_seeds} seeds", fontsize=9
    )
    fig.tight_layout()
    return fig


def plot_image_grid(
    result: AttributionResult, train_images: Tensor, query_images: Tensor, k: int = 4, labels: Tensor | None = None
) -> "Figure":
    """Each query image with the ``k`` training images whose removal raises its measurement most (green;
    for a loss, the most helpful) and the ``k`` whose removal lowers it most (red; for a loss, the most harmful).

    Args:
        train_images: ``[N, H, W]`` or ``[N, C, H, W]`` (C = 1 or 3), in training-set order.
        query_images: ``[Q, ...]`` likewise.
        labels: Optional ``[N]`` training labels, shown in the titles.
    """
    plt = _pyplot()

    def show(ax, image: Tensor, title: str, colour: str) -> None:
        image = image.detach().cpu()
        if image.ndim == 3:
            image = image.squeeze(0) if image.shape[0] == 1 else image.permute(1, 2, 0)
        ax.imshow(image.numpy(), cmap="gray_r" if image.ndim == 2 else None)
        ax.set_title(title, fontsize=7, color=colour)
        ax.axis("off")

    fig, axes = plt.subplots(
        result.num_queries, 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.5 * result.num_queries), squeeze=False
    )
    for q, row in enumerate(axes):
        show(row[0], query_images[q], f"query {q}", "black")
        cells = 1
        for largest, colour in ((True, "tab:green"), (False, "tab:red")):
            values, indices = result.top_k(q, k, largest=largest)
            for v, i in zip(values.tolist(), indices.tolist()):
                label = f" ({labels[i].item()})" if labels is not None else ""
                show(row[cells], train_images[i], f"#{i}{label}\n{v:+.2g}", colour)
                cells += 1
    fig.suptitle("query | removal raises the measurement most | removal lowers it most", fontsize=9)
    fig.tight_layout()
    return fig
