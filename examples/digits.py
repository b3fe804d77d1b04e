"""Record 4 seeds of an MLP on scikit-learn's digits, then attribute 5 test digits with EK-FAC.

    python examples/digits.py             # about a minute on 2 CPU cores
    python examples/digits.py --epochs 2  # a quick check

Writes, under --out: the recorded runs, the result (result.safetensors/.json), the logged table and
histogram (csv/), and influential_digits.png: each query with its most helpful and most harmful
training images.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, TrajectoryRecorder, figures


class DigitsMLP(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.03, momentum: float = 0.9, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)


class DigitsData(pl.LightningDataModule):
    """Digits split as in :func:`digits`; the validation set doubles as the query pool."""

    def __init__(self, n_train: int = 1000, batch_size: int = 32) -> None:
        super().__init__()
        self.train, self.test = digits(n_train)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=256)


def digits(n_train: int = 1000) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y)[order]
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("examples/output/digits"))
    args = parser.parse_args()

    train, test = digits()
    # One test digit of each of the first --queries classes.
    firsts = [int((test.tensors[1] == c).nonzero()[0]) for c in range(args.queries)]
    queries = TensorDataset(*test[firsts])
    shutil.rmtree(args.out / "runs", ignore_errors=True)  # a rerun records afresh

    for seed in range(args.seeds):
        pl.seed_everything(seed)
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            callbacks=[TrajectoryRecorder(args.out / "runs")],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(DigitsMLP(), DataLoader(train, batch_size=32, shuffle=True))

    attributor = Attributor(DigitsMLP, args.out / "runs", train, Influence(curvature="ekfac"))
    result = attributor.attribute(queries, loggers=CSVLogger(args.out, name="csv"))
    result.save(args.out / "result.safetensors")

    for q in range(result.num_queries):
        label = queries.tensors[1][q].item()
        print(f"query {q} (label {label}): base loss over seeds {result.measurements[:, q].mean():.3f}")
        for kind, largest in (("helpful", True), ("harmful", False)):
            values, indices = result.top_k(q, 3, largest=largest)
            listed = ", ".join(
                f"#{i} (label {train.tensors[1][i].item()}, {v:+.3g})"
                for v, i in zip(values.tolist(), indices.tolist())
            )
            print(f"  most {kind}: {listed}")
    images = lambda data: data.tensors[0].reshape(-1, 8, 8)  # noqa: E731
    figure = figures.plot_image_grid(result, images(train), images(queries), k=4, labels=train.tensors[1])
    figure.savefig(args.out / "influential_digits.png", dpi=110)
    print(f"wrote {args.out / 'influential_digits.png'}")


if __name__ == "__main__":
    main()
