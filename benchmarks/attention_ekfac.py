"""EK-FAC against the exact GGN on a small transformer classifier, scored against leave-one-out retraining.

    python benchmarks/attention_ekfac.py               # about 3 minutes on 2 CPU cores
    python benchmarks/attention_ekfac.py --write-docs  # into docs/benchmarks/attention_ekfac.md

Sequences of up to 8 tokens out of 10 (token 0 pads); the label says whether token 1 occurs more often than
token 2. The model: token and position embeddings, one ``nn.TransformerEncoderLayer`` (``bias=False``, no
dropout) with the padding mask, mean pooling over the real tokens and a linear head; AdamW. Two settings:
padded (lengths 3 to 8) and full-length sequences. 4 seeds; ground truth by coupled retraining of 40
removed examples; 20 queries. Each row attributes through the named modules only (``modules=``), with
EK-FAC and with the exact GGN, so a layer's Kronecker factorisation is compared with the exact curvature of
the very same parameters; the last row is the whole model (EK-FAC tracks all but the LayerNorms).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from digits_dtda import score
from docs_tables import invocation, write_table
from models import QUIET
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_dtda import (
    Attributor,
    Influence,
    TrajectoryRecorder,
    leave_one_out_weights,
    load_runs,
    retrain,
)

VOCAB, LENGTH, PAD = 10, 8, 0
MODULES = {
    "feed-forward and head": ("encoder.linear1", "encoder.linear2", "head"),
    "self-attention (in_proj, out_proj)": ("encoder.self_attn",),
    "token and position embeddings": ("embed", "pos"),
    "whole model": None,
}


class Sequences(Dataset):
    def __init__(self, n: int, seed: int, min_length: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_length, LENGTH + 1, (n,), generator=g)
        tokens = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        self.tokens = torch.where(torch.arange(LENGTH)[None] < lengths[:, None], tokens, PAD)
        self.labels = ((self.tokens == 1).sum(1) > (self.tokens == 2).sum(1)).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[i], "label": self.labels[i]}


class PaddedClassifier(pl.LightningModule):
    def __init__(self, d: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, d, padding_idx=PAD)
        self.pos = nn.Embedding(LENGTH, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, bias=False)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == PAD
        h = self.encoder(self.embed(tokens) + self.pos(torch.arange(tokens.shape[1])), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["tokens"]), batch["label"])

    def attribution_inputs_targets(self, batch):
        return batch["tokens"], batch["label"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = [
        "| sequences | attributed through | EK-FAC, Spearman mean shift | exact GGN | EK-FAC / GGN |",
        "|---|---|---|---|---|",
    ]
    for setting, min_length in (("padded (3-8 tokens)", 3), ("full length (8 tokens)", LENGTH)):
        train, queries = Sequences(160, 0, min_length), Sequences(20, 1, min_length)
        with tempfile.TemporaryDirectory() as folder:
            runs_dir = Path(folder) / "runs"
            for seed in range(args.seeds):
                pl.seed_everything(seed)
                pl.Trainer(max_epochs=15, callbacks=[TrajectoryRecorder(runs_dir)], **QUIET).fit(
                    PaddedClassifier(), DataLoader(train, batch_size=16, shuffle=True)
                )
            runs = load_runs(runs_dir)
            removed = torch.arange(0, len(train), 4)
            truth = retrain(PaddedClassifier, runs, train, queries, leave_one_out_weights(len(train), removed))
            for label, modules in MODULES.items():
                scores = {
                    curvature: score(
                        *truth.table(
                            Attributor(
                                PaddedClassifier, runs, train, Influence(curvature, modules=modules), progress=False
                            ).attribute(queries),
                            "mean",
                        )
                    )
                    for curvature in ("ekfac", "ggn")
                }
                ratio = scores["ekfac"] / scores["ggn"] if scores["ggn"] > 0 else float("nan")
                rows.append(f"| {setting} | {label} | {scores['ekfac']:.3f} | {scores['ggn']:.3f} | {ratio:.2f} |")
                print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.write_docs:
        write_table("attention_ekfac", "main", table, command=invocation())


if __name__ == "__main__":
    main()
