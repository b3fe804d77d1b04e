import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_dtda import AttributionCallback, AttributionResult, TrajectoryRecorder
from models import TinyClassifier, classification_data, trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two seeds, each fitted with the recorder and the attribution callback, logging to CSV and TensorBoard."""
    tmp_path = tmp_path_factory.mktemp("callback")
    data, queries = classification_data(n=24), classification_data(n=3, seed=1)
    for seed in range(2):
        pl.seed_everything(seed)
        loggers = [CSVLogger(tmp_path / "csv", version=seed), TensorBoardLogger(tmp_path / "tb", version=seed)]
        callback = AttributionCallback(queries, curvature="ggn", top_k=2, progress=False)
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), callback], max_epochs=2, logger=loggers).fit(
            TinyClassifier(), DataLoader(data, batch_size=8, shuffle=True))
    return callback.result, loggers, tmp_path


def test_callback_attributes_every_run_so_far_and_saves(fitted):
    result, _, tmp_path = fitted
    assert result.runs == ["seed_0", "seed_1"] and result.effects.shape == (2, 3, 24)
    saved = AttributionResult.load(tmp_path / "runs" / "attribution.pt")
    assert torch.equal(saved.effects, result.effects)


def test_callback_logs_table_histogram_and_figure(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, (csv_logger, tb_logger), _ = fitted
    with open(f"{csv_logger.log_dir}/attribution_top_k.csv") as f:
        rows = list(csv.DictReader(f))
    _, indices = result.top_k(2, 2, largest=False)
    assert [int(r["train_index"]) for r in rows if r["query"] == "2" and r["kind"] == "harmful"] == indices.tolist()
    with open(f"{csv_logger.log_dir}/attribution_shift_scatter.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    events = EventAccumulator(tb_logger.log_dir, size_guidance={"histograms": 0, "images": 0, "tensors": 0}).Reload()
    [histogram] = events.Histograms("attribution/mean_shift")
    assert histogram.histogram_value.num == 3 * 24
    for name in ("shift_scatter", "spread_wideners"):
        [image] = events.Images(f"attribution/{name}")
        assert image.encoded_image_string.startswith(b"\x89PNG")
    with open(f"{csv_logger.log_dir}/attribution_spread_wideners.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_callback_without_recorder_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="needs a TrajectoryRecorder"):
        trainer(tmp_path, [AttributionCallback(classification_data(n=2))], max_epochs=1).fit(
            TinyClassifier(), DataLoader(classification_data(n=8), batch_size=4))


def test_callback_every_n_epochs_logs_on_the_training_timeline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path / "tb")
    callbacks = [TrajectoryRecorder(tmp_path / "runs"),
                 AttributionCallback(classification_data(n=2, seed=1), curvature="identity", every_n_epochs=2, progress=False)]
    model = TinyClassifier()
    trainer(tmp_path, callbacks, max_epochs=4, logger=logger).fit(model, DataLoader(classification_data(n=16), batch_size=4))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    steps = [h.step for h in events.Histograms("attribution/mean_shift")]
    assert steps[:2] == [8, 16]  # after epochs 2 and 4 (4 steps each), then once more at the end of fit
    assert model.training  # the callback attributed a copy
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer"):
        AttributionCallback(every_n_epochs=0)
