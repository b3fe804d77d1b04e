"""The training features a replay must reproduce, as factors with levels, and a LightningModule that
trains with any combination of them (tests/test_replay_matrix.py crosses them pairwise)."""

from __future__ import annotations

import itertools
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

# Each factor's levels; the first level of each is the plain one.
FACTORS: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "sgd_nesterov", "adam", "adamw", "two_groups", "amsgrad"),
    "scheduler": ("none", "warmup_cosine_step", "steplr_epoch", "onecycle", "plateau", "warm_restarts"),
    "accumulate": ("1", "2", "3"),
    "clip": ("none", "norm", "value"),
    "layers": ("bn_dropout_cnn", "layernorm_dropout_mlp", "bn1d_mlp", "bn_momentum_none"),
    "stop": ("max_epochs", "early_stopping", "max_steps", "limit_train_batches", "val_check_interval"),
    "precision": ("32-true", "bf16-mixed"),
    "resume": ("none", "checkpoint"),  # "checkpoint": stopped after the first epoch, resumed from its checkpoint
}

# Levels the replay refuses before any work, with the words of the refusal.
REFUSED = {
    ("optimizer", "amsgrad"): "amsgrad=True",
    ("layers", "bn_momentum_none"): "momentum=None",
}


def pairwise(factors: dict[str, tuple[str, ...]]) -> list[dict[str, str]]:
    """A small set of cases in which every pair of levels of two factors occurs at least once (greedy
    covering array, deterministic)."""
    names = list(factors)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]}
    cases = []
    while uncovered:
        # Start from an uncovered pair and fill the other factors greedily.
        (a, x), (b, y) = min(uncovered)
        case = {a: x, b: y}
        for name in names:
            if name not in case:
                case[name] = max(
                    factors[name], key=lambda level, name=name: _gain(names, {**case, name: level}, uncovered)
                )
        cases.append(case)
        uncovered -= {((p, case[p]), (q, case[q])) for p, q in itertools.combinations(names, 2)}
    return cases


def _gain(names: list[str], trial: dict[str, str], uncovered: set) -> int:
    """How many uncovered pairs a partial case covers (pairs in the factors' order)."""
    present = [n for n in names if n in trial]
    return sum(((p, trial[p]), (q, trial[q])) in uncovered for p, q in itertools.combinations(present, 2))


class FeatureModule(pl.LightningModule):
    """A classifier of 1x4x4 images trained with the optimizer, scheduler and layers its ``case`` names."""

    def __init__(self, optimizer: str = "sgd", scheduler: str = "none", layers: str = "bn_dropout_cnn") -> None:
        super().__init__()
        self.save_hyperparameters()
        if layers in ("bn_dropout_cnn", "bn_momentum_none"):
            momentum = None if layers == "bn_momentum_none" else 0.1
            self.net = nn.Sequential(
                nn.Conv2d(1, 3, 3, padding=1, bias=False),
                nn.BatchNorm2d(3, momentum=momentum),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Flatten(),
                nn.Linear(48, 3),
            )
        elif layers == "layernorm_dropout_mlp":
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)
            )
        else:
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        kind = self.hparams.optimizer
        params = list(self.parameters())
        if kind == "sgd":
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
        elif kind == "sgd_nesterov":
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
        elif kind == "adam":
            optimizer = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)
        elif kind == "adamw":
            optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
        elif kind == "amsgrad":
            optimizer = torch.optim.Adam(params, lr=1e-2, amsgrad=True)
        else:  # two groups: the head with its own learning rate and no weight decay
            head = list(self.net[-1].parameters())
            body = [p for p in params if all(p is not h for h in head)]
            optimizer = torch.optim.SGD(
                [{"params": body, "weight_decay": 1e-3}, {"params": head, "lr": 0.02}], lr=0.1, momentum=0.5
            )
        schedule = self.hparams.scheduler
        if schedule == "none":
            return optimizer
        if schedule == "warmup_cosine_step":

            def warmup_cosine(step: int) -> float:
                return (step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 3) / 20)))

            scheduler = {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine), "interval": "step"}
        elif schedule == "steplr_epoch":
            scheduler = {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5), "interval": "epoch"}
        elif schedule == "onecycle":
            onecycle = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=40,
                cycle_momentum="momentum" in optimizer.defaults or "betas" in optimizer.defaults,
            )
            scheduler = {"scheduler": onecycle, "interval": "step"}
        elif schedule == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
            scheduler = {"scheduler": plateau, "monitor": "val_loss", "interval": "epoch"}
        else:
            restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=3)
            scheduler = {"scheduler": restarts, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
