"""Find mislabelled training digits by self-influence pooled over seeds.

    python examples/clean_digits.py              # about 30 s on 2 CPU cores
    python examples/clean_digits.py --epochs 2   # a quick check

Flips 10% of the training labels (so the answer is known), records 4 seeds of the digits MLP, and
ranks every training example by its self-influence: how much removing it would raise its own loss,
averaged over the seeds. An example the model fits only because it was trained on it (a wrong label,
an odd image) has a large self-influence. Writes, under --out:

- ``csv/version_*/self_influence.csv``: the whole ranking (index, label, mean self-influence, its 90%
  bootstrap interval over seeds, mean training loss, whether the label was flipped), and the logged
  scalars (``metrics.csv``), through the trainer's ``CSVLogger``;
- ``suspicious_digits.png``: the top 24 images with their (possibly wrong) labels, flipped ones in red.

With real data the flips are unknown: inspect the top of the ranking, fix or drop what is wrong, retrain.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits import DigitsMLP, digits
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, SelfInfluence, TrajectoryRecorder


def flip_labels(data: TensorDataset, fraction: float = 0.1, seed: int = 0) -> tuple[TensorDataset, torch.Tensor]:
    """A copy of ``data`` with ``fraction`` of its labels changed to another class, and the changed indices."""
    x, y = data.tensors
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(y), generator=generator)[: round(fraction * len(y))]
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=generator)) % 10
    return TensorDataset(x, noisy), flipped


def image_grid(images: torch.Tensor, titles: list[str], colours: list[str], columns: int = 8):
    import matplotlib.pyplot as plt  # the "plot" extra, only needed here

    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title, colour in zip(axes.flat, images, titles, colours):
        ax.imshow(image.numpy(), cmap="gray_r")
        ax.set_title(title, fontsize=7, color=colour)
    figure.suptitle(
        "most self-influential training digits: #index (label), mean self-influence; red: label flipped", fontsize=9
    )
    figure.tight_layout()
    return figure


def log_ranking(loggers: list[Logger], rows: list[dict], metrics: dict[str, float], figure) -> None:
    """Scalars to every logger; the ranking as a CSV file in a CSVLogger's folder; the figure to TensorBoard."""
    for logger in loggers:
        logger.log_metrics(metrics)
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "self_influence.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("self_influence/suspicious", figure, close=False)
        logger.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("examples/output/clean_digits"))
    args = parser.parse_args()

    clean, _ = digits()
    train, flipped = flip_labels(clean)
    shutil.rmtree(args.out / "runs", ignore_errors=True)  # a rerun records afresh

    logger = CSVLogger(args.out, name="csv")
    for seed in range(args.seeds):
        pl.seed_everything(seed)
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            callbacks=[TrajectoryRecorder(args.out / "runs")],
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(DigitsMLP(), DataLoader(train, batch_size=32, shuffle=True))

    result: SelfInfluence = Attributor(
        DigitsMLP, args.out / "runs", train, Influence(curvature="ekfac")
    ).self_influence()
    score = result.mean_shift()
    low, high = result.interval("mean")
    order = score.argsort(descending=True)
    is_flipped = torch.zeros(len(train), dtype=torch.bool)
    is_flipped[flipped] = True
    labels = train.tensors[1]
    rows = [
        {
            "rank": rank,
            "train_index": i,
            "label": labels[i].item(),
            "self_influence_mean": score[i].item(),
            "interval_low": low[i].item(),
            "interval_high": high[i].item(),
            "train_loss_mean": result.losses[:, i].mean().item(),
            "flipped": bool(is_flipped[i]),
        }
        for rank, i in enumerate(order.tolist(), start=1)
    ]
    top = order[:24]
    figure = image_grid(
        train.tensors[0][top].reshape(-1, 8, 8),
        [f"#{i} ({labels[i]})\n{score[i]:.2g}" for i in top.tolist()],
        ["tab:red" if is_flipped[i] else "black" for i in top.tolist()],
    )
    found = {f"self_influence/flipped_in_top_{k}": is_flipped[order[:k]].float().mean().item() for k in (25, 50, 100)}
    log_ranking(trainer.loggers, rows, found, figure)
    figure.savefig(args.out / "suspicious_digits.png", dpi=110)

    print(
        f"{len(flipped)} of {len(train)} labels flipped; ranked by self-influence pooled over {result.num_seeds} seeds:"
    )
    for k in (25, 50, 100):
        print(f"  top {k}: {found[f'self_influence/flipped_in_top_{k}']:.0%} flipped")
    print(f"wrote {Path(logger.log_dir) / 'self_influence.csv'} and {args.out / 'suspicious_digits.png'}")


if __name__ == "__main__":
    main()
