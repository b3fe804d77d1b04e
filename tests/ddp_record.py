"""Trains TinyClassifier with DDP on 2 CPU processes (gloo) and records it; run by test_ddp.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from models import TinyClassifier, classification_data  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_dtda import TrajectoryRecorder  # noqa: E402

if __name__ == "__main__":
    out, workers = Path(sys.argv[1]), int(sys.argv[2])
    pl.seed_everything(0)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrajectoryRecorder(out / "runs", every_n_train_steps=4)],
    )
    loader = DataLoader(
        classification_data(n=36), batch_size=5, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    trainer.fit(TinyClassifier(momentum=0.9, weight_decay=1e-3), loader)
    torch.distributed.destroy_process_group()  # see ddp_attribute_after_fit.py
