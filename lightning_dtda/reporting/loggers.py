"""Sending an ``AttributionResult`` to Lightning loggers."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_dtda.results.result import AttributionResult

TABLE_COLUMNS = ("query", "kind", "rank", "train_index", "mean_shift")
_HISTOGRAM_BINS = 50


def top_k_rows(result: AttributionResult, k: int) -> list[dict[str, Any]]:
    """Per query, the ``k`` examples whose removal raises the measurement most (``kind`` ``"removal_raises"``)
    and the ``k`` whose removal lowers it most (``"removal_lowers"``). For a loss these are the most helpful
    and the most harmful examples; for a measurement where higher is better (accuracy, a margin), the
    other way round, which is why the kinds say what removal does rather than judge it."""
    rows = []
    for q in range(result.num_queries):
        for kind, largest in (("removal_raises", True), ("removal_lowers", False)):
            values, indices = result.top_k(q, k, largest=largest)
            for rank, (v, i) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
                rows.append({"query": q, "kind": kind, "rank": rank, "train_index": i, "mean_shift": v})
    return rows


def summary_metrics(result: AttributionResult, prefix: str) -> dict[str, float]:
    shift = result.mean_shift()
    return {
        f"{prefix}/mean_shift_mean": shift.mean().item(),
        f"{prefix}/mean_shift_std": shift.std().item() if shift.numel() > 1 else 0.0,
        f"{prefix}/mean_shift_abs_max": shift.abs().max().item(),
    }


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in TABLE_COLUMNS)
            + " |"
        )
    return "\n".join(lines)


def _figures(result: AttributionResult) -> dict[str, Any]:
    # Figures need matplotlib (the "plot" extra) and a spread, i.e. two seeds; without, none.
    if result.num_seeds < 2:
        return {}
    try:
        from lightning_dtda.reporting.figures import plot_distributions, plot_shift_scatter
    except ImportError:
        return {}
    _, wideners = result.spread_wideners(query=0, k=3)
    return {
        "shift_scatter": plot_shift_scatter(result),
        "spread_wideners": plot_distributions(result, 0, wideners.tolist()),
    }


def log_result(
    result: AttributionResult,
    loggers: Sequence[Logger],
    k: int = 5,
    prefix: str = "attribution",
    step: int | None = None,
) -> None:
    """Log summary scalars, a top-``k`` table per query and a histogram of mean shifts to each logger.

    ``step`` (e.g. the trainer's global step) places scalars, TensorBoard text, histograms and figures
    on the training timeline; files (CSV, MLflow artifacts) hold the latest result.

    - every logger: the scalars ``{prefix}/mean_shift_mean``, ``_std`` and ``_abs_max`` (``log_metrics``);
    - ``CSVLogger``: ``{log_dir}/{prefix}_top_k.csv`` (columns ``query, kind, rank, train_index,
      mean_shift``), ``{log_dir}/{prefix}_histogram.csv`` (``left, right, count``) and, with two or
      more seeds and matplotlib, the figures ``{log_dir}/{prefix}_shift_scatter.png`` (mean against
      std shift of every example) and ``{prefix}_spread_wideners.png`` (query 0's base and predicted
      distributions for its three top spread-wideners);
    - ``TensorBoardLogger``: the table as text ``{prefix}/top_k``, the histogram ``{prefix}/mean_shift``
      and the figures ``{prefix}/shift_scatter`` and ``{prefix}/spread_wideners``;
    - ``MLFlowLogger`` (extra ``mlflow``): artifacts ``{prefix}_top_k.json`` (column -> values),
      ``{prefix}_histogram.json`` and the two figures as PNG;
    - ``WandbLogger`` (extra ``wandb``): the table ``{prefix}/top_k``, the histogram
      ``{prefix}/mean_shift`` and the two figures as images.
    """
    if not isinstance(result, AttributionResult):
        raise TypeError(
            f"log_result logs an AttributionResult (effects on queries), got {type(result).__name__}. For self-influence, "
            "log its top_k() yourself, as examples/clean_digits.py does."
        )
    if not loggers:
        return
    rows = top_k_rows(result, k)
    shift = result.mean_shift().flatten().double()
    counts = torch.histc(shift, bins=_HISTOGRAM_BINS, min=shift.min().item(), max=shift.max().item())
    edges = torch.linspace(shift.min().item(), shift.max().item(), _HISTOGRAM_BINS + 1)
    histogram = [
        {"left": edges[i].item(), "right": edges[i + 1].item(), "count": int(c)} for i, c in enumerate(counts.tolist())
    ]
    figures = _figures(result)
    metrics = summary_metrics(result, prefix)
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, CSVLogger):
            log_dir = Path(logger.log_dir)
            _write_csv(log_dir / f"{prefix}_top_k.csv", TABLE_COLUMNS, rows)
            _write_csv(log_dir / f"{prefix}_histogram.csv", ("left", "right", "count"), histogram)
            for name, figure in figures.items():
                figure.savefig(log_dir / f"{prefix}_{name}.png", dpi=110)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(f"{prefix}/top_k", _markdown(rows), global_step=step)
            logger.experiment.add_histogram(f"{prefix}/mean_shift", shift.numpy(), global_step=step)
            for name, figure in figures.items():
                logger.experiment.add_figure(f"{prefix}/{name}", figure, global_step=step, close=False)
        elif isinstance(logger, MLFlowLogger):
            # log_dict, not log_table: MLflow's tables need pandas.
            client, run_id = logger.experiment, logger.run_id
            client.log_dict(run_id, {c: [row[c] for row in rows] for c in TABLE_COLUMNS}, f"{prefix}_top_k.json")
            client.log_dict(run_id, histogram, f"{prefix}_histogram.json")
            for name, figure in figures.items():
                client.log_figure(run_id, figure, f"{prefix}_{name}.png")
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.log_table(
                key=f"{prefix}/top_k",
                columns=list(TABLE_COLUMNS),
                data=[[row[c] for c in TABLE_COLUMNS] for row in rows],
            )
            logger.experiment.log({f"{prefix}/mean_shift": wandb.Histogram(shift.numpy())})
            for name, figure in figures.items():
                logger.log_image(key=f"{prefix}/{name}", images=[figure])
        logger.save()
    if figures:
        import matplotlib.pyplot as plt

        for figure in figures.values():
            plt.close(figure)
