"""Trains with DDP on 2 CPU processes and attributes right after fit on every rank, as the README's lines
do; run by test_ddp.py."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from models import TinyClassifier, classification_data  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_dtda import Attributor, Influence, TrajectoryRecorder  # noqa: E402


class SlowRankZero(pl.Callback):
    """Rank zero reaches the recorder's end of training 2 s after the others: without the recorder's
    barrier, rank one would read the run before it is marked finished, every time."""

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            time.sleep(2)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SlowRankZero(), TrajectoryRecorder(out / "runs")],
    )
    data = classification_data(n=36, dtype=torch.float64)
    trainer.fit(TinyClassifier(momentum=0.9), DataLoader(data, batch_size=5, shuffle=True))
    # No barrier here: the README's lines, right after fit, on every rank.
    result = Attributor(TinyClassifier, out / "runs", data, Influence("ggn", damping=0.1), progress=False).attribute(
        classification_data(n=3, seed=1, dtype=torch.float64)
    )
    if trainer.is_global_zero:
        result.save(out / "result.safetensors")
    # torch asks every script to do this: without it, gloo's worker threads can abort the process at
    # interpreter exit ("terminate called without an active exception"), as one CI run saw.
    torch.distributed.destroy_process_group()
