"""CUDA-only checks (skipped without a GPU; `pytest -m gpu` runs just these): 16-mixed training with a
CUDA gradient scaler records the steps it skipped, and the replay skips them."""

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from models import WeightedCNN, image_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import TrajectoryRecorder, load_runs
from lightning_dtda.model.instantiate import instantiate
from lightning_dtda.replay.engine import replay

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gap(replayed, recorded):
    return max(((t[0] - recorded[n].to(t)).abs().max() / recorded[n].abs().max()).item() for n, t in replayed.items())


def test_a_16_mixed_cuda_run_records_the_steps_its_gradient_scaler_skipped_and_the_replay_skips_them(tmp_path):
    data = image_data(24)
    pl.seed_everything(0)
    # A scale of 2^20 overflows float16 gradients: the scaler skips steps (halving its scale) until it fits.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**20)
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=3)],
        accelerator="gpu",
        max_epochs=4,
        plugins=[MixedPrecision("16-mixed", "cuda", scaler)],
    ).fit(WeightedCNN(lr=0.1), DataLoader(data, batch_size=6, shuffle=True))
    [run] = load_runs(tmp_path / "runs")
    skipped = [step.skipped for step in run.steps]
    assert run.manifest.precision == "16-mixed" and skipped[0] and not all(skipped)
    model = instantiate(WeightedCNN, run, 0, torch.device("cuda"))
    ones = torch.ones(1, len(data), device="cuda")
    assert gap(replay(model, run, data, ones), run.state_dict()) < 2e-2  # float16 rounding, not reproduced
    # Replaying the skipped steps as if they had happened lands far away: the record is what makes it right.
    object.__setattr__(run, "steps", [dataclasses.replace(step, skipped=False) for step in run.steps])
    assert gap(replay(model, run, data, ones), run.state_dict()) > 0.1
