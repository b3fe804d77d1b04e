"""The estimators as objects: pinned numbers across the redesign, settings as cache key and record,
and configuration from a LightningCLI file."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from models import ReLUClassifier, TinyClassifier, classification_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import (
    AttributionCallback,
    Attributor,
    Influence,
    Segmented,
    TrajectoryRecorder,
    Unrolled,
    load_runs,
)

DATA = Path(__file__).parent / "data"
# Effects computed by release 0.1.0 (keyword form, e.g. Attributor(..., method="segmented", segments=2,
# curvature="ggn")) on the run in data/runs_0_1, which that release recorded. The redesign must not move them.
PINNED = json.loads((DATA / "pinned_effects.json").read_text())


def pinned_data():
    return classification_data(n=24, dtype=torch.float64), classification_data(n=2, seed=1, dtype=torch.float64)


def record_pinned_run(tmp_path):
    """The recording that made data/runs_0_1, with this version's recorder."""
    data, _ = pinned_data()
    pl.seed_everything(0)
    trainer(
        tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=4)], max_epochs=3, precision="64-true"
    ).fit(
        ReLUClassifier(hidden=5, lr=0.2, momentum=0.5, weight_decay=1e-2), DataLoader(data, batch_size=6, shuffle=True)
    )
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory):
    return record_pinned_run(tmp_path_factory.mktemp("pinned"))


@pytest.mark.parametrize("name", PINNED)
@pytest.mark.parametrize("recorded_by", ["0.1.0", "this version"])
def test_estimators_give_the_numbers_of_release_0_1(name, recorded_by, fresh_runs):
    data, queries = pinned_data()
    runs = DATA / "runs_0_1" if recorded_by == "0.1.0" else fresh_runs
    estimator = eval(name, {"Influence": Influence, "Unrolled": Unrolled, "Segmented": Segmented})
    result = Attributor(ReLUClassifier, runs, data, estimator, progress=False).attribute(queries)
    torch.testing.assert_close(
        result.effects[0], torch.tensor(PINNED[name]["effects"], dtype=torch.float64), rtol=1e-7, atol=1e-12
    )
    torch.testing.assert_close(result.measurements[0], torch.tensor(PINNED[name]["measurements"], dtype=torch.float64))
    assert {k: result.settings[k] for k in estimator.settings()} == estimator.settings()


def test_a_run_recorded_by_release_0_1_reads_as_finished_with_the_same_weights(fresh_runs):
    [old], [new] = load_runs(DATA / "runs_0_1"), load_runs(fresh_runs)
    assert old.status == new.status == "finished" and old.manifest.writer is None
    assert old.snapshot_steps == new.snapshot_steps == [0, 4, 8, 12]
    for a, b in zip(old.steps, new.steps):
        assert a.lrs == b.lrs and all(torch.equal(x, y) for x, y in zip(a.micro_batches, b.micro_batches))
    # The same training on another CPU's kernels differs by ~1e-16 (float64): compare with a tolerance.
    for k, weight in old.state_dict().items():
        torch.testing.assert_close(weight, new.state_dict()[k], rtol=1e-12, atol=1e-12)


def test_settings_are_the_cache_key(tmp_path):
    """Two estimators that differ in one setting never share a cache file; equal ones always do."""
    data, queries = pinned_data()
    runs = DATA / "runs_0_1"
    paths = {
        Attributor(ReLUClassifier, runs, data, estimator, cache_dir=tmp_path).cache_path(load_runs(runs)[0], "q")
        for estimator in (
            Influence(),
            Influence(damping=0.1),
            Influence(curvature="ggn"),
            Segmented(),
            Segmented(segments=2),
            Unrolled(),
            Unrolled(relu_smoothing=0.1),
            Influence(curvature="auto", damping="auto"),  # the defaults, spelled out
        )
    }
    assert len(paths) == 7


def cli_callbacks(tmp_path, estimator_yaml):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: lightning_dtda.TrajectoryRecorder\n      init_args: {{dirpath: {tmp_path / 'runs'}}}\n"
        "    - class_path: lightning_dtda.AttributionCallback\n      init_args:\n"
        f"        cache_dir: {tmp_path / 'cache'}\n        batch_size: 7\n"
        + "".join(f"        {line}\n" for line in estimator_yaml.splitlines())
    )
    cli = LightningCLI(TinyClassifier, run=False, args=["--config", str(config)], save_config_callback=None)
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, AttributionCallback)]
    return callback


@pytest.mark.parametrize(
    "estimator_yaml, expected",
    [
        ("", Influence()),
        (
            "estimator:\n  class_path: lightning_dtda.Influence\n  init_args: {curvature: ggn, damping: 0.01}",
            Influence("ggn", 0.01),
        ),
        (
            "estimator:\n  class_path: lightning_dtda.Unrolled\n  init_args: {relu_smoothing: 0.1}",
            Unrolled(relu_smoothing=0.1),
        ),
        (
            "estimator:\n  class_path: lightning_dtda.Segmented\n  init_args: {segments: 2, curvature: ggn}",
            Segmented(2, "ggn"),
        ),
        (
            "estimator:\n  class_path: lightning_dtda.Influence\n  init_args: {modules: [net.0, net.2]}",
            Influence(modules=["net.0", "net.2"]),
        ),
    ],
)
def test_every_estimator_is_configurable_from_a_lightning_cli_file(tmp_path, estimator_yaml, expected):
    callback = cli_callbacks(tmp_path, estimator_yaml)
    assert callback.estimator == expected
    assert callback.cache_dir == str(tmp_path / "cache") and callback.batch_size == 7


def test_a_bad_setting_in_a_cli_file_is_refused_when_the_file_is_parsed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_callbacks(
            tmp_path, "estimator:\n  class_path: lightning_dtda.Segmented\n  init_args: {segments: 2, curvature: kfac}"
        )
    assert "Expected a typing.Literal['auto', 'ekfac', 'ggn']. Got value: kfac" in capsys.readouterr().err
    with pytest.raises(ValueError, match="segments must be a positive integer, got 0"):
        cli_callbacks(tmp_path, "estimator:\n  class_path: lightning_dtda.Segmented\n  init_args: {segments: 0}")


def test_a_result_prints_its_shape_and_estimator_not_its_numbers():
    data, queries = pinned_data()
    result = Attributor(ReLUClassifier, DATA / "runs_0_1", data, Influence("identity", 0.5), progress=False).attribute(
        queries
    )
    assert repr(result) == (
        "AttributionResult(effects [seeds, queries, train] = [1, 2, 24], runs=['seed_0'], "
        "{'estimator': 'Influence', 'curvature': 'identity', 'damping': 0.5, 'solver': 'auto', 'curvature_subset': None, 'modules': None})"
    )


def test_a_run_trained_through_lightning_cli_is_attributed_with_the_class(tmp_path):
    """LightningCLI adds ``_instantiator`` to a module's saved hyperparameters; the class is still built from them."""
    from lightning_dtda import TrajectoryRecorder

    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  hidden: 7\n  lr: 0.2\ntrainer:\n  max_epochs: 2\n  logger: false\n  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n  callbacks:\n"
        f"    - class_path: lightning_dtda.TrajectoryRecorder\n      init_args: {{dirpath: {tmp_path / 'runs'}}}\n"
    )
    cli = LightningCLI(TinyClassifier, run=False, args=["--config", str(config)], save_config_callback=None)
    data, queries = classification_data(n=12), classification_data(n=3, seed=1)
    assert any(isinstance(c, TrajectoryRecorder) for c in cli.trainer.callbacks)
    cli.trainer.fit(cli.model, DataLoader(data, batch_size=4))
    [run] = load_runs(tmp_path / "runs")
    assert "_instantiator" in run.manifest.hparams and run.manifest.hparams["hidden"] == 7
    result = Attributor(TinyClassifier, run.path.parent, data, Influence(damping=0.1), progress=False).attribute(
        queries
    )
    assert result.effects.shape == (1, 3, 12) and torch.isfinite(result.effects).all()
