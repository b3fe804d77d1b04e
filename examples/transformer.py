"""Record 2 seeds of a small transformer on a synthetic sequence task, then attribute 4 test sequences
with EK-FAC (its embeddings, attention and linear layers) and with the exact GGN (every parameter, by conjugate
gradients).

    python examples/transformer.py             # well under a minute on 2 CPU cores
    python examples/transformer.py --epochs 2  # a quick check

The task: sequences of 8 tokens out of 8; the label says whether token 1 occurs more often than
token 2, so the model must count across positions. The model: token and position embeddings, one
``nn.TransformerEncoderLayer`` (self-attention, feed-forward, two LayerNorms), a final LayerNorm and a
linear head, trained with AdamW. It is written as it would be without attribution in mind: EK-FAC
tracks the token and position embeddings, the attention's projections and the ``nn.Linear`` layers
(feed-forward pair, head) and leaves out the LayerNorms; the exact GGN tracks everything. Writes the runs and both results
under --out.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, TrajectoryRecorder

VOCAB, LENGTH = 8, 8


class SequenceClassifier(pl.LightningModule):
    def __init__(self, d: int = 16, heads: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(LENGTH, d)
        self.encoder = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.norm(self.encoder(h)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)


def sequences(n: int, seed: int) -> TensorDataset:
    """``n`` random sequences and whether token 1 occurs more often than token 2 in each."""
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, ((x == 1).sum(1) > (x == 2).sum(1)).long())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.flatten().argsort().argsort(), b.flatten().argsort().argsort()]).double()
    return torch.corrcoef(ranks)[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("examples/output/transformer"))
    args = parser.parse_args()

    train, test = sequences(256, seed=0), sequences(64, seed=1)
    queries = TensorDataset(*test[:4])
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
        trainer.fit(SequenceClassifier(), DataLoader(train, batch_size=32, shuffle=True))
        with torch.no_grad():
            accuracy = (trainer.lightning_module(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean()
        print(f"seed {seed}: test accuracy {accuracy:.2f}")

    results = {}
    for name, estimator in (
        ("ekfac", Influence(curvature="ekfac")),
        ("ggn", Influence(curvature="ggn", solver="krylov")),
    ):
        results[name] = Attributor(SequenceClassifier, args.out / "runs", train, estimator, progress=False).attribute(
            queries
        )
        results[name].save(args.out / f"result-{name}.safetensors")
        tracked = results[name].settings["per_run"][0].get("parameters")
        layers = sorted({p.rpartition(".")[0] for p in tracked}) if tracked else ["every parameter"]
        print(f"{name}: tracked {', '.join(layers)}")

    for q in range(len(queries)):
        tokens, label = queries[q]
        print(
            f"query {q} {tokens.tolist()} (label {label.item()}): base loss over seeds {results['ggn'].measurements[:, q].mean():.3f}"
        )
        for name, result in results.items():
            values, indices = result.top_k(q, 3)
            listed = ", ".join(
                f"#{i} (label {train.tensors[1][i].item()}, {v:+.2g})"
                for v, i in zip(values.tolist(), indices.tolist())
            )
            print(f"  most helpful by {name}: {listed}")
    agreement = spearman(results["ekfac"].mean_shift(), results["ggn"].mean_shift())
    print(f"Spearman of EK-FAC (tracked layers) against the exact GGN (all parameters), mean shifts: {agreement:.2f}")


if __name__ == "__main__":
    main()
