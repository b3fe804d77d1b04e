"""The CNN of the public benchmark's second row: the layers that compute differently in training."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(pl.LightningModule):
    """Conv(8)-BatchNorm-ReLU-max-pool, Dropout(0.2), Linear on 8x8 digits (flat ``[B, 64]`` inputs);
    SGD with momentum and weight decay, a cosine schedule over ``total_steps``."""

    def __init__(self, channels: int = 8, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-4,
                 dropout: float = 0.2, total_steps: int = 320) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 16, 10),
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
