"""The models and data the benchmarks share.

A benchmark runs as ``python benchmarks/X.py``, which puts this folder on ``sys.path``: ``from models import
DigitsMLP`` then finds this file. ``DigitsMLP`` and ``digits`` are copies of ``examples/digits.py``'s (the
benchmarks do not import the examples), so a change to an example does not move a benchmark's numbers.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Trajectory, TrajectoryRecorder

# -- The digits MLP of examples/digits.py ------------------------------------------------------------------


# Trainer settings for a benchmark's training runs: CPU, nothing logged, checkpointed or drawn.
QUIET = dict(
    accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


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


def digits(n_train: int = 1000) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits in a fixed permutation (seed 0), scaled to [0, 1]: the first ``n_train`` and the rest."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y)[order]
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


# -- The public benchmark (digits_dtda.py, also adam_damping.py and unrolled_speed.py) ----------------------


def benchmark_data() -> tuple[TensorDataset, TensorDataset]:
    """The public benchmark's 500 training digits and 50 queries (the same permutation as ``digits``)."""
    train, rest = digits(500)
    return train, TensorDataset(*rest[:50])


class AdamMLP(DigitsMLP):
    """The benchmark MLP trained with Adam (lr 1e-3) instead of SGD."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=self.hparams.weight_decay)


class DigitsCNN(pl.LightningModule):
    """Conv(8)-BatchNorm-ReLU-max-pool, Dropout(0.2), Linear on 8x8 digits (flat ``[B, 64]`` inputs);
    SGD with momentum and weight decay, a cosine schedule over ``total_steps``."""

    def __init__(
        self,
        channels: int = 8,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        dropout: float = 0.2,
        total_steps: int = 320,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * 16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=h.total_steps)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


# -- The settings of speed.py (also krylov.py and snapshot_io.py) -------------------------------------------

# Training images the CNN's GGN products run on: each block-CG iteration is one pass over them with all
# 50 queries as columns, so its cost is linear in this number.
GGN_SUBSET = 200


class UpsampledDigitsCNN(pl.LightningModule):
    """Two conv layers and a 4096x256 linear layer: about 1.07M parameters on 32x32 inputs."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


# setting: (module class, epochs)
SPEED_SETTINGS = {"mlp": (DigitsMLP, 20), "cnn": (UpsampledDigitsCNN, 2)}


def speed_data(setting: str) -> tuple[TensorDataset, TensorDataset]:
    """``"mlp"``: 1,000 digits and 50 queries; ``"cnn"``: 3,000 digits upsampled to 32x32 (the first 1,500,
    then the same flipped left to right) and 50 queries."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y)[order]
    if setting == "mlp":
        return TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:1050], y[1000:1050])
    images = F.interpolate(x.reshape(-1, 1, 8, 8), size=32, mode="bilinear", align_corners=False)
    index = torch.arange(3000) % 1500  # 3,000 examples from the first 1,500 digits, flipped on the second pass
    train = torch.where((torch.arange(3000) >= 1500)[:, None, None, None], images[index].flip(-1), images[index])
    return TensorDataset(train, y[index]), TensorDataset(images[1500:1550], y[1500:1550])


def record_speed_run(setting: str, root: Path) -> Path:
    """One recorded seed (0) of ``setting`` under ``root``, trained unless already there; its runs folder.

    The folder is named after the module class, so runs recorded with another class are not taken for these.
    """
    cls, epochs = SPEED_SETTINGS[setting]
    runs = root / cls.__name__
    if not runs.exists():
        pl.seed_everything(0)
        pl.Trainer(max_epochs=epochs, callbacks=[TrajectoryRecorder(runs)], **QUIET).fit(
            cls(), DataLoader(speed_data(setting)[0], batch_size=32, shuffle=True)
        )
    return runs


# -- Recorded weights -----------------------------------------------------------------------------------------


def final_model(cls: type[nn.Module], run: Trajectory, snapshot: int = -1) -> nn.Module:
    """``cls`` built from ``run``'s recorded hyperparameters with its weights at ``snapshot`` (default: the
    final one), in eval mode: what the benchmarks need of a run's module, through the public ``Trajectory``."""
    model = cls(**run.manifest.hparams)
    model.load_state_dict(run.state_dict(snapshot))
    return model.eval()
