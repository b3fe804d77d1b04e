"""Small modules and data shared by the tests (importable, so recorded runs can re-import them)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class TinyClassifier(pl.LightningModule):
    """An MLP with (x, y) batches and mean cross-entropy: the default hooks apply."""

    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3, lr: float = 0.1,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)


class ReLUClassifier(TinyClassifier):
    """TinyClassifier with a ReLU instead of tanh."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.net[1] = nn.ReLU()


class LinearRegression(pl.LightningModule):
    """One linear layer with mean squared error."""

    def __init__(self, d_in: int = 4, d_out: int = 1, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def classification_data(n: int = 40, d_in: int = 6, classes: int = 3, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, classes, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    return TensorDataset(x, y)


def regression_data(n: int = 40, d_in: int = 4, d_out: int = 1, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, d_out, generator=g, dtype=dtype)
    y = x @ w + 0.3 * torch.randn(n, d_out, generator=g, dtype=dtype)
    return TensorDataset(x, y)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)
