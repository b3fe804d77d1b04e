import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import TinyClassifier, classification_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import AttributionCallback, AttributionResult, Influence, TrajectoryRecorder, load_runs


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two seeds, each fitted with the recorder and the attribution callback, logging to CSV and TensorBoard."""
    tmp_path = tmp_path_factory.mktemp("callback")
    data, queries = classification_data(n=24), classification_data(n=3, seed=1)
    for seed in range(2):
        pl.seed_everything(seed)
        loggers = [CSVLogger(tmp_path / "csv", version=seed), TensorBoardLogger(tmp_path / "tb", version=seed)]
        callback = AttributionCallback(queries, estimator=Influence(curvature="ggn"), top_k=2, progress=False)
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), callback], max_epochs=2, logger=loggers).fit(
            TinyClassifier(), DataLoader(data, batch_size=8, shuffle=True)
        )
    return callback.result, loggers, tmp_path


def test_callback_attributes_every_run_so_far_and_saves(fitted):
    result, _, tmp_path = fitted
    assert result.runs == ["seed_0", "seed_1"] and result.effects.shape == (2, 3, 24)
    saved = AttributionResult.load(tmp_path / "runs" / "attribution.safetensors")
    assert torch.equal(saved.effects, result.effects)


def test_callback_logs_table_histogram_and_figure(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, (csv_logger, tb_logger), _ = fitted
    with open(f"{csv_logger.log_dir}/attribution_top_k.csv") as f:
        rows = list(csv.DictReader(f))
    _, indices = result.top_k(2, 2, largest=False)
    assert [
        int(r["train_index"]) for r in rows if r["query"] == "2" and r["kind"] == "removal_lowers"
    ] == indices.tolist()
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
            TinyClassifier(), DataLoader(classification_data(n=8), batch_size=4)
        )


def test_callback_every_n_epochs_logs_on_the_training_timeline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path / "tb")
    callbacks = [
        TrajectoryRecorder(tmp_path / "runs"),
        AttributionCallback(
            classification_data(n=2, seed=1),
            estimator=Influence(curvature="identity"),
            every_n_epochs=2,
            progress=False,
        ),
    ]
    model = TinyClassifier()
    trainer(tmp_path, callbacks, max_epochs=4, logger=logger).fit(
        model, DataLoader(classification_data(n=16), batch_size=4)
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    steps = [h.step for h in events.Histograms("attribution/mean_shift")]
    assert steps[:2] == [8, 16]  # after epochs 2 and 4 (4 steps each), then once more at the end of fit
    assert model.training  # the callback attributed a copy
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer"):
        AttributionCallback(every_n_epochs=0)


def test_repeated_train_seeds_with_the_callback_leaves_finished_runs_untouched(tmp_path):
    from lightning_dtda import train_seeds

    loader = DataLoader(classification_data(n=16), batch_size=4, shuffle=True)
    kwargs = dict(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )

    def callbacks():
        return [AttributionCallback(classification_data(n=2, seed=1), Influence(curvature="identity"), progress=False)]

    train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[0, 1], callbacks=callbacks(), **kwargs)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("seed_*/**/*") if p.is_file()}
    assert all(run.status == "finished" for run in load_runs(tmp_path / "runs"))
    train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[0, 1, 2], callbacks=callbacks(), **kwargs)
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert [run.status for run in load_runs(tmp_path / "runs")] == ["finished"] * 3


def test_the_end_of_fit_result_is_logged_at_the_last_step_once(tmp_path):
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path / "csv")
    callback = AttributionCallback(
        classification_data(n=2, seed=1), Influence(curvature="identity"), every_n_epochs=1, progress=False
    )
    # Listed before the recorder, whose interval is 2 epochs: it still attributes each epoch's weights.
    trainer(
        tmp_path, [callback, TrajectoryRecorder(tmp_path / "runs", every_n_epochs=2)], max_epochs=2, logger=logger
    ).fit(TinyClassifier(), DataLoader(classification_data(n=16), batch_size=4))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("attribution/mean_shift_mean")]
    assert steps == [4, 8]  # epochs 1 and 2; the end of fit reuses the last epoch's result
    saved = AttributionResult.load(tmp_path / "runs" / "attribution.safetensors")
    assert saved.settings["run_status"] == ["finished"] and saved.settings["snapshot_steps"] == [8]
    assert saved.settings["precision"] == ["32-true"]


def test_missing_query_data_is_reported_before_training(tmp_path):
    class Counts(TinyClassifier):
        steps = 0

        def training_step(self, batch, batch_idx):
            Counts.steps += 1
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="no validation dataloader to take queries from; pass query_data"):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), AttributionCallback()], max_epochs=1).fit(
            Counts(), DataLoader(classification_data(n=8), batch_size=4)
        )
    assert Counts.steps == 0
    with pytest.raises(RuntimeError, match="needs a TrajectoryRecorder among the trainer's callbacks"):
        trainer(tmp_path, [AttributionCallback(classification_data(n=2))], max_epochs=1).fit(
            Counts(), DataLoader(classification_data(n=8), batch_size=4)
        )
    assert Counts.steps == 0


def test_queries_default_to_the_validation_set_even_when_validation_is_off(tmp_path):
    pl.seed_everything(0)
    dm = pl.LightningDataModule.from_datasets(classification_data(n=16), classification_data(n=6, seed=1), batch_size=4)
    callback = AttributionCallback(num_queries=3, estimator=Influence(curvature="identity"), progress=False)
    model = TinyClassifier()
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), callback], max_epochs=1, limit_val_batches=0).fit(
        model, datamodule=dm
    )
    assert callback.result.effects.shape == (1, 3, 16)
    x, y = classification_data(n=6, seed=1).tensors  # the first 3 validation examples, not training ones
    expected = torch.nn.functional.cross_entropy(model(x[:3]), y[:3], reduction="none").detach()
    assert torch.allclose(callback.result.measurements[0], expected, atol=1e-6)


def test_a_run_no_replay_reproduces_is_named_before_training(tmp_path):
    """Attention dropout inside torch's fused kernel: the recorder warns at the first batch which estimators
    will refuse the run, and AttributionCallback refuses a replaying estimator before any step, not after fit
    (where Unrolled met it). Under AdamW Segmented replays too, so the advice is Influence alone."""
    from models import TinyTransformer, token_data

    from lightning_dtda import Segmented, Unrolled, UnsupportedTrainingError

    data, loader = token_data(16), DataLoader(token_data(16), batch_size=8)
    with pytest.warns(
        UserWarning,
        match=r"no replay can reproduce it: attention 'layer.self_attn' has dropout=0.1 inside torch's fused attention "
        r"kernel.*Unrolled, retrain and Segmented will refuse it; Influence\(\) will not",
    ):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
            TinyTransformer(attention_dropout=True), loader
        )
    for estimator in (Unrolled(), Segmented(segments=1, curvature="ggn")):
        fit = trainer(tmp_path, [TrajectoryRecorder(tmp_path / "more"), AttributionCallback(data, estimator=estimator)])
        with pytest.raises(
            UnsupportedTrainingError,
            match=rf"AttributionCallback's {type(estimator).__name__} replays the run, and no replay can reproduce this "
            r"module's training: attention 'layer.self_attn'.*Use Influence\(\) for it; Segmented\(\) refuses it too",
        ):
            fit.fit(TinyTransformer(attention_dropout=True), loader)
        assert fit.global_step == 0
    # Influence needs no replay: the callback attributes the same module
    callback = AttributionCallback(data, progress=False)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "ok"), callback], max_epochs=1).fit(
        TinyTransformer(attention_dropout=True), loader
    )
    assert callback.result.effects.shape == (1, 16, 16) and torch.isfinite(callback.result.effects).all()


def test_callbacks_no_attribution_follows_are_named_before_training(tmp_path):
    """Weight averaging (any estimator) and a changing accumulation (a replaying one) are refused before any
    step, not after training."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging

    from lightning_dtda import Unrolled, UnsupportedTrainingError

    data = classification_data(n=16)
    cases = [
        (StochasticWeightAveraging(swa_lrs=0.05), Influence(), r"cannot attribute a run trained with Stochastic"),
        (GradientAccumulationScheduler({1: 2}), Unrolled(), r"GradientAccumulationScheduler changes its training"),
    ]
    for callback, estimator, refusal in cases:
        attribution = AttributionCallback(data, estimator=estimator, progress=False)
        fit = trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), callback, attribution], max_epochs=2)
        with pytest.raises(UnsupportedTrainingError, match=refusal):
            fit.fit(TinyClassifier(), DataLoader(data, batch_size=4))
        assert fit.global_step == 0
