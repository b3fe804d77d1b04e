"""Small modules and data shared by the tests (importable, so recorded runs can re-import them)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class TinyClassifier(pl.LightningModule):
    """An MLP with (x, y) batches and mean cross-entropy: the default hooks apply."""

    def __init__(
        self,
        d_in: int = 6,
        hidden: int = 8,
        classes: int = 3,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )


class ReLUClassifier(TinyClassifier):
    """TinyClassifier with a ReLU instead of tanh."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.net[1] = nn.ReLU()


class SmallCNN(pl.LightningModule):
    """Conv-BatchNorm-ReLU-max-pool, dropout and a linear head on ``(image [B, 1, 6, 6], label, index)``
    batches: the layers that compute differently in training. SGD (momentum, weight decay) or Adam, with
    a cosine schedule."""

    def __init__(
        self,
        channels: int = 3,
        classes: int = 3,
        lr: float = 0.1,
        optimizer: str = "sgd",
        dropout: float = 0.3,
        total_steps: int = 12,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * 9, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def attribution_inputs_targets(self, batch):
        return batch[0], batch[1]

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-3)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.total_steps)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class WeightedCNN(SmallCNN):
    """SmallCNN trained on ``(x, y, index)`` batches with example ``removed``'s loss weighted by
    ``weight``: Lightning's own reweighted retraining, the oracle of the replay."""

    def __init__(self, removed: int = -1, weight: float = 1.0, **hparams) -> None:
        super().__init__(**hparams)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        weights = torch.where(index == self.hparams.removed, self.hparams.weight, 1.0).to(x.dtype)
        return (F.cross_entropy(self(x), y, reduction="none") * weights).mean()


class RecipeCNN(WeightedCNN):
    """The recipe users train: a bias-free convolution, BatchNorm, dropout; AdamW with a per-step warm-up
    and cosine LambdaLR; a validation loss for EarlyStopping. Example ``removed``'s loss is weighted by
    ``weight`` (Lightning's own reweighted retraining)."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.net[0] = nn.Conv2d(1, self.hparams.channels, 3, padding=1, bias=False)  # bias-free before a batch norm

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)

        def warmup_cosine(step: int) -> float:
            return (step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 3) / 12)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def image_data(n: int = 24, classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """``(image [1, 6, 6], label, index)`` examples; the label is the brightest of ``classes`` regions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.stack([x[:, 0, :, 2 * k : 2 * k + 2].mean((1, 2)) for k in range(classes)], 1).argmax(1)
    return TensorDataset(x, y, torch.arange(n))


class TinyTransformer(pl.LightningModule):
    """Token embeddings, one ``nn.TransformerEncoderLayer`` (attention, LayerNorm, dropout) and a linear
    head on ``[B, T]`` token batches; AdamW."""

    def __init__(self, vocab: int = 12, d: int = 8, dropout: float = 0.1, attention_dropout: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True)
        if not attention_dropout:
            self.layer.self_attn.dropout = 0.0
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def token_data(n: int = 24, length: int = 5, vocab: int = 12, seed: int = 0) -> TensorDataset:
    """Token sequences labelled by whether token 3 occurs."""
    x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x == 3).any(1).long())


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


def classification_data(
    n: int = 40, d_in: int = 6, classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, classes, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    return TensorDataset(x, y)


def regression_data(
    n: int = 40, d_in: int = 4, d_out: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, d_out, generator=g, dtype=dtype)
    y = x @ w + 0.3 * torch.randn(n, d_out, generator=g, dtype=dtype)
    return TensorDataset(x, y)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def fit_weighted_cnn(tmp_path, data, recorder=True, precision="64-true", **hparams):
    """Train a WeightedCNN with gradient clipping (seed 0, batches of 6, 2 epochs), recording a snapshot every 3 steps."""
    from lightning_dtda import TrajectoryRecorder

    pl.seed_everything(0)
    model = WeightedCNN(**hparams)
    callbacks = [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=3)] if recorder else []
    trainer(tmp_path, callbacks, max_epochs=2, precision=precision, gradient_clip_val=0.5).fit(
        model, torch.utils.data.DataLoader(data, batch_size=6, shuffle=True)
    )
    return model


class ColumnRegression(LinearRegression):
    """``[B, 1]`` outputs trained against ``[B]`` targets: training_step squeezes, the default hooks cannot know."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)


class LogitClassifier(LinearRegression):
    """One logit trained with binary cross-entropy on float 0/1 targets ``[B, 1]``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)


class SaysBCE(LogitClassifier):
    """LogitClassifier with the loss hook that settles the ambiguity of float 0/1 targets."""

    def attribution_loss_function(self):
        return nn.BCEWithLogitsLoss()


class TokenBag(pl.LightningModule):
    """Token embeddings averaged, a LayerNorm and a linear head, regressing ``[B, outputs]`` targets with
    mean squared error: one nn.Linear among layers K-FAC has no factors for."""

    def __init__(self, vocab: int = 10, d: int = 4, outputs: int = 2, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed, self.norm, self.head = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.Linear(d, outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).mean(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class LoneEmbedding(pl.LightningModule):
    """One token per example, looked up and mapped by a frozen linear head, with mean squared error: the
    embedding is the only trainable weight and the outputs are linear in it."""

    def __init__(self, vocab: int = 10, d: int = 4, outputs: int = 2, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, outputs)
        self.head.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens[:, 0]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([self.embed.weight], lr=self.hparams.lr)


def token_regression_data(
    n: int = 24, length: int = 4, vocab: int = 10, outputs: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TensorDataset:
    """Token sequences and targets ``[outputs]``: a random value per token, summed, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    values = torch.randn(vocab, outputs, generator=g, dtype=dtype)
    return TensorDataset(x, values[x].sum(1) + 0.3 * torch.randn(n, outputs, generator=g, dtype=dtype))


class Mapped(Dataset):
    """``data``'s ``(x, y)`` examples passed through ``fn``: dict or nested examples, as datasets give them."""

    def __init__(self, data, fn):
        self.data, self.fn = data, fn

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.fn(*self.data[i])
