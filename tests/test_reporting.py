import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import TinyClassifier, classification_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import Attributor, Influence, TrajectoryRecorder


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reporting")
    data = classification_data(n=24)
    pl.seed_everything(0)
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    fit_trainer = trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=2, logger=loggers)
    fit_trainer.fit(TinyClassifier(), DataLoader(data, batch_size=8, shuffle=True))
    result = Attributor(
        TinyClassifier, tmp_path / "runs", data, estimator=Influence(curvature="ggn"), progress=False
    ).attribute(classification_data(n=2, seed=1), loggers=fit_trainer, top_k=3)
    return result, loggers


def test_csv_logger_gets_table_histogram_and_scalars(logged):
    result, (csv_logger, _) = logged
    with open(f"{csv_logger.log_dir}/attribution_top_k.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3  # queries x (helpful, harmful) x k
    helpful = [r for r in rows if r["query"] == "1" and r["kind"] == "removal_raises"]
    values, indices = result.top_k(1, 3)
    assert [int(r["train_index"]) for r in helpful] == indices.tolist()
    assert [float(r["mean_shift"]) for r in helpful] == pytest.approx(values.tolist())
    with open(f"{csv_logger.log_dir}/attribution_histogram.csv") as f:
        assert sum(int(r["count"]) for r in csv.DictReader(f)) == result.num_queries * result.num_train
    with open(f"{csv_logger.log_dir}/metrics.csv") as f:
        logged_rows = [r for r in csv.DictReader(f) if r.get("attribution/mean_shift_abs_max")]
    assert float(logged_rows[-1]["attribution/mean_shift_abs_max"]) == pytest.approx(
        result.mean_shift().abs().max().item()
    )


def test_tensorboard_logger_gets_text_and_histogram(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, (_, tb_logger) = logged
    events = EventAccumulator(tb_logger.log_dir, size_guidance={"tensors": 0, "histograms": 0}).Reload()
    [histogram] = events.Histograms("attribution/mean_shift")
    assert histogram.histogram_value.num == result.num_queries * result.num_train
    assert histogram.histogram_value.max == pytest.approx(result.mean_shift().max().item())
    [text] = events.Tensors("attribution/top_k/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    _, indices = result.top_k(0, 3, largest=False)
    assert f"| 0 | removal_lowers | 1 | {indices[0].item()} |" in table
    assert [s.value for s in events.Scalars("attribution/mean_shift_abs_max")] == pytest.approx(
        [result.mean_shift().abs().max().item()]
    )


def test_mlflow_logger_gets_table_histogram_and_figure(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow logging is tested when the mlflow extra is installed")
    import json

    from lightning.pytorch.loggers import MLFlowLogger

    from lightning_dtda import AttributionResult, log_result

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in to local file stores
    g = torch.Generator().manual_seed(0)
    result = AttributionResult(torch.randn(3, 2, 7, generator=g), torch.randn(3, 2, generator=g), ["a", "b", "c"])
    logger = MLFlowLogger(experiment_name="attribution", tracking_uri=f"file:{tmp_path}/mlruns")
    log_result(result, [logger], k=2)
    [artifacts] = list((tmp_path / "mlruns").glob(f"*/{logger.run_id}/artifacts"))
    table = json.loads((artifacts / "attribution_top_k.json").read_text())
    _, indices = result.top_k(1, 2)
    helpful = [
        i
        for q, kind, i in zip(table["query"], table["kind"], table["train_index"])
        if q == 1 and kind == "removal_raises"
    ]
    assert helpful == indices.tolist()
    assert sum(b["count"] for b in json.loads((artifacts / "attribution_histogram.json").read_text())) == 14
    for name in ("shift_scatter", "spread_wideners"):
        assert (artifacts / f"attribution_{name}.png").read_bytes().startswith(b"\x89PNG")


def test_wandb_offline_logger_gets_table_and_figure(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B logging is tested when the wandb extra is installed")
    import json

    from lightning.pytorch.loggers import WandbLogger

    from lightning_dtda import AttributionResult, log_result

    monkeypatch.setenv("WANDB_SILENT", "true")
    g = torch.Generator().manual_seed(0)
    result = AttributionResult(torch.randn(3, 2, 7, generator=g), torch.randn(3, 2, generator=g), ["a", "b", "c"])
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="attribution")
    log_result(result, [logger], k=2)
    files = logger.experiment.dir
    logger.experiment.finish()
    [table_file] = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/attribution/top_k_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["query", "kind", "rank", "train_index", "mean_shift"]
    _, indices = result.top_k(0, 2, largest=False)
    assert [row[3] for row in table["data"] if row[0] == 0 and row[1] == "removal_lowers"] == indices.tolist()
    for name in ("shift_scatter", "spread_wideners"):
        [image] = list((tmp_path / "wandb").glob(f"offline-run-*/files/media/images/attribution/{name}_*.png"))
        assert image.read_bytes().startswith(b"\x89PNG")
    assert files.startswith(str(tmp_path))


@pytest.mark.parametrize("progress", [True, False])
def test_progress_is_one_bar_per_stage_of_ours_and_none_when_silenced(tmp_path, capfd, progress):
    """curvlinops' internal bars ("KFAC matrices", "Eigenvalue correction") never show; ``progress=False``
    silences every bar."""
    from lightning_dtda import Attributor, Influence, TrajectoryRecorder

    data = classification_data(n=24)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        TinyClassifier(), DataLoader(data, batch_size=8)
    )
    capfd.readouterr()
    Attributor(TinyClassifier, tmp_path / "runs", data, Influence("ekfac", damping=0.1), progress=progress).attribute(
        classification_data(n=2, seed=1)
    )
    err = capfd.readouterr().err
    assert "matrices" not in err and "Eigenvalue correction" not in err
    assert ("ekfac data pass" in err and "attributing (influence-ekfac)" in err) == progress
    assert ("it/s" in err or "s/it" in err) == progress
