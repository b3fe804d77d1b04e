"""Bad input fails early with a message that says what to do."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import (
    ColumnRegression,
    LinearRegression,
    LogitClassifier,
    Mapped,
    SaysBCE,
    TinyClassifier,
    classification_data,
    regression_data,
    trainer,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, MissingHookError, Segmented, TrajectoryRecorder, Unrolled, load_runs
from lightning_dtda.errors import CorruptFileError, DatasetMismatchError, UnsupportedTrainingError


def DictData(data):
    return Mapped(data, lambda x, y: {"x": x, "y": y})


class DictBatches(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])


class WithLayerNorm(TinyClassifier):
    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


class NoHparams(TinyClassifier):
    def __init__(self, hidden):
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def record(tmp_path, module, data, name="runs", seed=0):
    pl.seed_everything(seed)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / name)], max_epochs=1).fit(module, DataLoader(data, batch_size=8))
    return tmp_path / name


@pytest.fixture
def data():
    return classification_data(n=16)


@pytest.fixture
def runs(tmp_path, data):
    return record(tmp_path, TinyClassifier(), data)


def test_module_without_hooks_for_its_batches(tmp_path, data, caplog):
    """Refused before anything runs or is said (the default's choice of curvature was logged first), naming the
    loss-function hook too: float targets in [0, 1] would need it, which only the next attempt could show."""
    dict_data = DictData(data)
    runs = record(tmp_path, DictBatches(), dict_data)
    for estimator in (Influence(curvature="identity"), Influence()):
        attributor = Attributor(DictBatches, runs, dict_data, estimator=estimator, progress=False)
        with (
            caplog.at_level("INFO"),
            pytest.raises(
                MissingHookError,
                match=r"DictBatches needs the attribution hook `attribution_inputs_targets`.*floats all between 0 and 1, "
                r"`attribution_loss_function` is needed too(.|\n)*def attribution_inputs_targets\(self, batch\)",
            ),
        ):
            attributor.attribute(dict_data)
        assert "uses" not in caplog.text


def test_hooks_make_such_a_module_work(tmp_path, data):
    class WithHooks(DictBatches):
        def attribution_inputs_targets(self, batch):
            return batch["x"], batch["y"]

    dict_data = DictData(data)
    runs = record(tmp_path, WithHooks(), dict_data)
    result = Attributor(WithHooks, runs, dict_data, estimator=Influence(curvature="ggn"), progress=False).attribute(
        dict_data
    )
    assert result.effects.shape == (1, 16, 16) and torch.isfinite(result.effects).all()


def test_training_data_other_than_recorded(runs, data):
    with pytest.raises(DatasetMismatchError, match="has 15 examples but run seed_0 was recorded on 16"):
        Attributor(TinyClassifier, runs, TensorDataset(*data[:15]))
    shuffled = TensorDataset(*data[torch.randperm(16, generator=torch.Generator().manual_seed(0))])
    with pytest.raises(ValueError, match="different content or order"):
        Attributor(TinyClassifier, runs, shuffled)


class PrivateNoise(torch.utils.data.Dataset):
    """Augments with a NumPy generator of its own, which no seeding of the global generators reaches."""

    def __init__(self, data):
        self.data, self.rng = data, np.random.default_rng(0)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + torch.from_numpy(self.rng.normal(0, 0.1, tuple(x.shape))).to(x.dtype), y


def test_training_data_that_changes_at_every_read_is_named_for_it(runs, data):
    """Its fingerprint differs from the recorded one, as shuffled data's would, but the cause is its own generator."""
    with pytest.raises(DatasetMismatchError, match="train_data's items change from one read to the next"):
        Attributor(TinyClassifier, runs, PrivateNoise(data))


class GlobalNoise(torch.utils.data.Dataset):
    """Augments with torch's global generator: replayable only through ReplayableAugmentation."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.1 * torch.randn(x.shape), y


def test_the_recorder_says_at_the_start_what_the_data_or_the_precision_will_keep_from_attribution(tmp_path, data):
    """Not after training, when the estimators refuse the run: lost views, a generator of the dataset's own,
    mixed precision. Replayable data in full precision gets none of these warnings."""
    from lightning_dtda import ReplayableAugmentation

    cases = [
        (GlobalNoise(data), "32-true", r"\(GlobalNoise\) draws random numbers when read .* not wrapped"),
        (PrivateNoise(data), "32-true", r"\(PrivateNoise\) changes from one read to the next .* every estimator"),
        (data, "bf16-mixed", r"precision='bf16-mixed': retrain will refuse it"),
    ]
    for index, (train, precision, why) in enumerate(cases):
        with pytest.warns(UserWarning, match=why):
            pl.seed_everything(0)
            trainer(tmp_path, [TrajectoryRecorder(tmp_path / f"runs_{index}")], max_steps=1, precision=precision).fit(
                TinyClassifier(), DataLoader(train, batch_size=8)
            )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TrajectoryRecorder records this run")
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "replayable")], max_steps=1).fit(
            TinyClassifier(), DataLoader(ReplayableAugmentation(GlobalNoise(data)), batch_size=8)
        )


class Dropped(TinyClassifier):
    def __init__(self, dropout: float = 0.3, **hparams):
        super().__init__(**hparams)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))


def test_a_replay_of_a_module_with_other_dropout_rates_is_refused_naming_them(tmp_path, data):
    """A change made after building (dropout set to 0, as the recorder advises for attention) is not in the
    recorded hyperparameters, so the class is rebuilt without it; an instance that drops out at other rates
    than the run did is refused too (it failed after the first interval, blaming the loss)."""
    from lightning_dtda import retrain

    changed = Dropped()
    changed.net[2].p = 0.0
    runs = record(tmp_path, changed, data)
    with pytest.raises(
        UnsupportedTrainingError, match=r"other rates than run seed_0's model did \(net.2: 0.0 in training, 0.3 here\)"
    ):
        Attributor(Dropped, runs, data, Unrolled(), progress=False).attribute(data)
    assert torch.isfinite(Attributor(changed, runs, data, Unrolled(), progress=False).attribute(data).effects).all()
    dropped = record(tmp_path, Dropped(), data, name="dropped")
    with pytest.raises(UnsupportedTrainingError, match=r"\(net.2: 0.3 in training, 0.0 here\)"):
        retrain(changed, dropped, data, data, torch.ones(1, 16), progress=False)


def test_truncated_snapshot_file(runs, data):
    [run] = load_runs(runs)
    path = run.path / run.snapshots[-1].file
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="step_00000002.safetensors does not match the checksum recorded for it"):
        Attributor(TinyClassifier, runs, data, progress=False).attribute(data)


def test_non_finite_gradients_name_the_examples(runs, data):
    x, y = data[:4]
    x = x.clone()
    x[2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite gradients for examples \[2\]"):
        Attributor(TinyClassifier, runs, data, estimator=Influence(curvature="identity"), progress=False).attribute(
            TensorDataset(x, y)
        )


def test_bad_arguments(runs, data):
    with pytest.raises(ValueError, match="damping must be 'auto' or a positive number, got 0"):
        Influence(damping=0)
    with pytest.raises(ValueError, match="curvature must be 'auto' or one of"):
        Influence(curvature="hessian")
    with pytest.raises(ValueError, match="segments must be a positive integer, got 0"):
        Segmented(segments=0)
    with pytest.raises(TypeError, match="estimator must be an Estimator such as Influence()"):
        Attributor(TinyClassifier, runs, data, estimator="ekfac")
    with pytest.raises(ValueError, match="query_data is empty"):
        Attributor(TinyClassifier, runs, data, progress=False).attribute(TensorDataset(*data[:0]))
    with pytest.raises(TypeError, match=r"query_data is a tuple of tensors; pass a Dataset, such as TensorDataset"):
        Attributor(TinyClassifier, runs, data, progress=False).attribute(data.tensors)


def test_folders_without_runs_or_with_mixed_runs(tmp_path, data):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no recorded run"):
        load_runs(tmp_path / "empty")
    record(tmp_path, TinyClassifier(), data, seed=0)
    record(tmp_path, TinyClassifier(), classification_data(n=16, seed=5), seed=1)
    with pytest.raises(DatasetMismatchError, match="The runs mix datasets: seed_0 and seed_1"):
        load_runs(tmp_path / "runs")
    # given as trajectories, bypassing load_runs: seed_1 would be attributed with seed_0's examples
    from lightning_dtda import retrain
    from lightning_dtda.runs.trajectory import Trajectory

    trajectories = [Trajectory(tmp_path / "runs" / "seed_0"), Trajectory(tmp_path / "runs" / "seed_1")]
    with pytest.raises(DatasetMismatchError, match="The runs mix datasets: seed_0 and seed_1"):
        Attributor(TinyClassifier, trajectories, data, progress=False)
    with pytest.raises(DatasetMismatchError, match="The runs mix datasets: seed_0 and seed_1"):
        retrain(TinyClassifier, trajectories, data, data, torch.ones(1, 16))


def test_module_class_other_than_recorded(runs, data):
    with pytest.raises(ValueError, match="trained models.TinyClassifier, not test_errors.WithLayerNorm"):
        Attributor(WithLayerNorm, runs, data, progress=False).attribute(data)
    # the same name in another module (code moved) is taken for it, with a warning
    moved = type("TinyClassifier", (TinyClassifier,), {"__module__": "package.moved"})
    for estimator in (Influence(), Segmented(segments=1)):  # Segmented builds the module again at snapshots
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every call warns that asks to: once per run, not again by the estimator
            result = Attributor(moved, runs, data, estimator=estimator, progress=False).attribute(data)
        messages = [str(w.message) for w in caught if "module class" in str(w.message)]
        assert messages == [
            "The runs recorded their module class as models.TinyClassifier; taking package.moved.TinyClassifier, of "
            "the same name, for it."
        ]
        assert result.effects.shape == (1, 16, 16)


def test_class_that_cannot_be_rebuilt_from_hparams(tmp_path, data):
    runs = record(tmp_path, NoHparams(hidden=5), data)
    with pytest.raises(TypeError, match="pass an instance instead of the class"):
        Attributor(NoHparams, runs, data, progress=False).attribute(data)
    result = Attributor(
        NoHparams(hidden=5), runs, data, estimator=Influence(curvature="ggn"), progress=False
    ).attribute(data)
    assert result.effects.shape == (1, 16, 16)
    with pytest.raises(
        ValueError,
        match=r"module given does not match run seed_0's weights \(size mismatch for net.2.weight: copying a param "
        r"with shape .*\)\. Pass the class",
    ):
        Attributor(NoHparams(hidden=7), runs, data, progress=False).attribute(data)


def test_an_instance_built_with_other_hyperparameters_is_named_in_the_error_or_a_warning(runs, data):
    with pytest.raises(
        ValueError, match=r"\): run seed_0 was trained with hidden=8; the module given has hidden=6. Pass the class"
    ):
        Attributor(TinyClassifier(hidden=6), runs, data, progress=False).attribute(data)
    with pytest.warns(
        UserWarning,
        match=r"not the one trained: run seed_0 was trained with lr=0.1; the module given has lr=0.5. Effects are",
    ):
        result = Attributor(
            TinyClassifier(lr=0.5), runs, data, estimator=Influence(curvature="identity"), progress=False
        ).attribute(data)
    assert result.effects.shape == (1, 16, 16)


def test_segmented_needs_curvature_functions_and_solvers_are_checked(runs, data, monkeypatch):
    with pytest.raises(
        ValueError, match="needs functions of the curvature: use curvature='ekfac' or 'ggn', not 'kfac'"
    ):
        Segmented(segments=1, curvature="kfac")
    with pytest.raises(
        ValueError, match="solver='krylov' chooses how curvature='ggn' is solved; curvature='ekfac' has one way"
    ):
        Influence(curvature="ekfac", solver="krylov")
    with pytest.raises(ValueError, match="solver must be one of"):
        Segmented(curvature="ggn", solver="cg")
    with pytest.raises(ValueError, match="curvature_subset must be None or a positive integer, got 0"):
        Influence(curvature="ggn", curvature_subset=0)
    monkeypatch.setattr("lightning_dtda.curvature.base.DENSE_GGN_LIMIT", 10)
    with pytest.raises(
        ValueError,
        match="solver='dense' builds a 83 x 83 GGN; above 10 parameters that is refused. Use solver='krylov'",
    ):
        Attributor(
            TinyClassifier, runs, data, estimator=Segmented(segments=1, curvature="ggn", solver="dense"), progress=False
        ).attribute(data)


def test_a_regression_whose_first_targets_lie_in_0_1_is_not_taken_for_labels(tmp_path):
    """The check before attribution reads a batch of 32, as the recorder's does, not the first two examples: a
    standardised regression target whose first two values happen to lie in [0, 1] is attributed."""
    x, y = regression_data(n=40).tensors
    y = torch.cat([torch.tensor([[0.2], [0.7]]), y[2:]])
    assert not ((y >= 0) & (y <= 1)).all()
    data = TensorDataset(x, y)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        LinearRegression(), DataLoader(data, batch_size=8)
    )
    result = Attributor(LinearRegression, tmp_path / "runs", data, progress=False).attribute(data)
    assert torch.isfinite(result.effects).all() and result.effects.abs().max() > 0


@pytest.mark.parametrize("estimator", [Influence(curvature="ggn"), Influence(curvature="ekfac"), Unrolled()])
def test_losses_and_shapes_the_defaults_would_get_wrong_are_refused(tmp_path, estimator):
    """No silent wrong number: [B, 1] outputs against [B] targets would broadcast to [B, B] under MSE, and
    float 0/1 targets could be BCE or MSE targets."""
    x, y = regression_data(n=16).tensors
    for cls, data, match in [
        (
            ColumnRegression,
            TensorDataset(x, y[:, 0]),
            r"attribution_inputs_targets`: the model's outputs have shape \(16, 1\) and the targets \(16,\), which MSELoss needs to be \(16, 1\)",
        ),
        (
            LogitClassifier,
            TensorDataset(x, (y > 0).float()),
            "attribution_loss_function`: the float targets checked \\(the first 16 examples'\\) all lie between 0 and 1, which could be targets of binary cross-entropy",
        ),
        # smoothed labels too: binary or soft cross-entropy targets, not regression ones
        (
            LogitClassifier,
            TensorDataset(x, 0.05 + 0.9 * (y > 0).float()),
            "attribution_loss_function`: the float targets checked .* all lie between 0 and 1, .* nn.CrossEntropyLoss\\(\\)",
        ),
    ]:
        pl.seed_everything(0)
        runs = tmp_path / f"{cls.__name__}{len(match)}"
        trainer(tmp_path, [TrajectoryRecorder(runs)], max_epochs=1).fit(cls(), DataLoader(data, batch_size=8))
        with pytest.raises(MissingHookError, match=match):
            Attributor(cls, runs, data, estimator=estimator, batch_size=2, progress=False).attribute(data)

    # saying which loss settles it: the measurement is the binary cross-entropy, computed here by hand
    data = TensorDataset(x, (y > 0).float())
    pl.seed_everything(0)
    model = SaysBCE()
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "bce")], max_epochs=1).fit(model, DataLoader(data, batch_size=8))
    result = Attributor(SaysBCE, tmp_path / "bce", data, estimator=estimator, progress=False).attribute(data)
    with torch.no_grad():
        z, t = model(x), (y > 0).float()
        by_hand = (torch.clamp(z, min=0) - z * t + torch.log1p(torch.exp(-z.abs()))).squeeze(1)
    assert torch.allclose(result.measurements[0], by_hand, atol=1e-6)
    assert torch.isfinite(result.effects).all()


def test_an_iterable_dataset_and_a_missing_cuda_device_are_refused_at_construction(runs, data):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(data)

    with pytest.raises(TypeError, match="train_data is an IterableDataset; .* needs a map-style Dataset"):
        Attributor(TinyClassifier, runs, Stream(), progress=False)
    with pytest.raises(
        RuntimeError,
        match=r"the train DataLoader's dataset is an IterableDataset \(Stream\), .* Train on a map-style Dataset",
    ):
        trainer(runs.parent, [TrajectoryRecorder(runs.parent / "stream")], max_epochs=1).fit(
            TinyClassifier(), DataLoader(Stream(), batch_size=8)
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but torch finds no CUDA device here; use device='cpu'"):
            Attributor(TinyClassifier, runs, data, device="cuda", progress=False)


def test_a_class_defined_in_the_training_script_is_found_when_imported_from_it(tmp_path):
    """Trained by `python train_script.py` (class recorded as __main__.Net), attributed by `python
    attribute_script.py` with `from train_script import Net`: taken for the same class, with a warning.
    Another class is still refused."""
    import subprocess
    import sys
    from pathlib import Path

    header = (
        "import sys, warnings\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import lightning.pytorch as pl\n"
        "from torch.utils.data import DataLoader\n"
        "from models import TinyClassifier, classification_data, trainer\n"
        "from lightning_dtda import Attributor, Influence, TrajectoryRecorder\n\n"
    )
    (tmp_path / "train_script.py").write_text(
        header + "class Net(TinyClassifier):\n    pass\n\n"
        "if __name__ == '__main__':\n"
        "    pl.seed_everything(0)\n"
        f"    trainer({str(tmp_path)!r}, [TrajectoryRecorder({str(tmp_path / 'runs')!r})], max_epochs=1).fit(\n"
        "        Net(hidden=4), DataLoader(classification_data(n=16), batch_size=8))\n"
    )
    (tmp_path / "attribute_script.py").write_text(
        header + "from train_script import Net\n\n"
        "data = classification_data(n=16)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    result = Attributor(Net, {str(tmp_path / 'runs')!r}, data, Influence(curvature='identity'), progress=False).attribute(data)\n"
        "print('effects', list(result.effects.shape))\n"
        "print('warned:', [str(w.message) for w in caught if 'module class' in str(w.message)][0])\n"
        "try:\n"
        f"    Attributor(TinyClassifier, {str(tmp_path / 'runs')!r}, data, progress=False).attribute(data)\n"
        "except ValueError as err:\n"
        "    print('refused:', err)\n"
    )
    subprocess.run([sys.executable, "train_script.py"], check=True, capture_output=True, cwd=tmp_path)
    out = subprocess.run([sys.executable, "attribute_script.py"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "effects [1, 16, 16]" in out.stdout
    assert (
        "warned: The runs recorded their module class as __main__.Net; taking train_script.Net, of the same name, for it."
        in out.stdout
    )
    assert (
        "refused: Run seed_0 trained __main__.Net, not models.TinyClassifier. Pass the class the run trained"
        in out.stdout
    )


def test_what_kfac_and_the_queries_would_get_silently_wrong_is_refused(tmp_path):
    """K-FAC leaves out pos_weight (and class weights, label smoothing); query
    targets shaped unlike the outputs would broadcast the measurement; a keyword-only forward cannot take
    the inputs positionally."""
    from lightning_dtda import retrain

    x, y = regression_data(n=16).tensors
    labels = (y[:, :1] > 0).float()

    class Weighted(SaysBCE):
        def attribution_loss_function(self):
            return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))

    for cls, data, match in [
        (Weighted, TensorDataset(x, labels), "curvlinops' K-FAC leaves out the loss's pos_weight"),
    ]:
        pl.seed_everything(0)
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / cls.__name__)], max_epochs=1).fit(
            cls(d_out=1), DataLoader(data, batch_size=8)
        )
        for curvature in ("kfac", "ekfac"):
            with pytest.raises(ValueError, match=f"curvature='{curvature}'.*{match}"):
                Attributor(
                    cls, tmp_path / cls.__name__, data, Influence(curvature=curvature), progress=False
                ).attribute(data)

    regression = TensorDataset(x, y[:, :1])
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "mse")], max_epochs=1).fit(
        LinearRegression(), DataLoader(regression, batch_size=8)
    )
    with pytest.raises(MissingHookError, match=r"outputs have shape \(4, 1\) and the targets \(4,\)"):
        Attributor(
            LinearRegression, tmp_path / "mse", regression, Influence(curvature="identity"), progress=False
        ).attribute(TensorDataset(x[:4], y[:4, 0]))
    with pytest.raises(
        MissingHookError, match=r"outputs have shape \(4, 1\) and the targets \(4,\)"
    ):  # the ground truth
        retrain(LinearRegression, tmp_path / "mse", regression, TensorDataset(x[:4], y[:4, 0]), torch.ones(1, 16))

    class KeywordOnly(LinearRegression):
        def forward(self, *, features):
            return self.linear(features)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self(features=batch[0]), batch[1])

    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "keyword")], max_epochs=1).fit(
        KeywordOnly(), DataLoader(regression, batch_size=8)
    )
    with pytest.raises(
        MissingHookError, match=r"attribution_inputs_targets`: the model cannot be called as model\(inputs\)"
    ):
        Attributor(KeywordOnly, tmp_path / "keyword", regression, Influence(curvature="ggn"), progress=False).attribute(
            regression
        )


def test_the_recorder_warns_at_the_first_batch_about_a_hook_attribution_will_need(tmp_path):
    """Not after hours of training: float 0/1 targets without a loss hook are named when recording starts,
    and training goes on; a module with the hook records without the warning."""
    x, y = regression_data(n=16).tensors
    data = TensorDataset(x, (y > 0).float())
    with pytest.warns(
        UserWarning,
        match="attributing it will fail as things are: .*attribution_loss_function`: the float targets checked",
    ):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "plain")], max_epochs=1).fit(
            LogitClassifier(), DataLoader(data, batch_size=8)
        )
    assert load_runs(tmp_path / "plain")[0].status == "finished"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "says")], max_epochs=1).fit(
            SaysBCE(), DataLoader(data, batch_size=8)
        )
    assert not [w for w in caught if "attributing it will fail" in str(w.message)]


def test_a_class_redefined_under_the_recorded_name_with_other_layers_is_named(tmp_path):
    """Trained with Tanh, attributed with a class of the same name and shapes but ReLU: the weights fit
    and the name matches, so only the recorded structure can tell; the effects would be another model's."""

    class Net(TinyClassifier):
        def __init__(self, **hparams):
            super().__init__(**hparams)
            self.net[1] = nn.Tanh()

    data = classification_data(n=16)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(Net(), DataLoader(data, batch_size=8))
    trained = Net

    class Net(TinyClassifier):  # noqa: F811 -- the redefinition is the point
        def __init__(self, **hparams):
            super().__init__(**hparams)
            self.net[1] = nn.ReLU()

    assert Net.__qualname__ == trained.__qualname__ and Net.__module__ == trained.__module__
    with pytest.warns(UserWarning, match=r"is not the code that trained run \S+: its layers \(repr\)"):
        Attributor(Net, tmp_path / "runs", data, estimator=Influence(curvature="identity"), progress=False).attribute(
            data
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Attributor(
            trained, tmp_path / "runs", data, estimator=Influence(curvature="identity"), progress=False
        ).attribute(data)
    assert not [w for w in caught if "is not the code" in str(w.message)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_class_indices_of_another_integer_dtype_name_the_inputs_hook(tmp_path, dtype):
    """Raw torch errors before (cross-entropy, then gather, refuse them); now the hook and the cast, at the
    first batch of recording and before any work when attributing."""

    class Casts(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y.long())

    x, y = classification_data(n=16).tensors
    data = TensorDataset(x, y.to(dtype))
    with pytest.warns(UserWarning, match=f"attribution_inputs_targets`: the targets are {dtype} class indices"):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
            Casts(), DataLoader(data, batch_size=8)
        )
    with pytest.raises(MissingHookError, match=r"return targets.long\(\) there"):
        Attributor(Casts, tmp_path / "runs", data, estimator=Influence(curvature="identity"), progress=False).attribute(
            data
        )


def test_log_result_and_self_influence_top_k(tmp_path):
    """log_result refuses a SelfInfluence with what to do (it raised AttributeError); top_k takes largest."""
    from lightning_dtda import log_result

    data = classification_data(n=16)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        TinyClassifier(), DataLoader(data, batch_size=8)
    )
    result = Attributor(
        TinyClassifier, tmp_path / "runs", data, estimator=Influence(curvature="identity"), progress=False
    ).self_influence()
    values, indices = result.top_k(3, largest=False)
    assert torch.equal(indices, result.mean_shift().argsort()[:3]) and torch.equal(
        values, result.mean_shift().sort().values[:3]
    )
    with pytest.raises(TypeError, match="log_result logs an AttributionResult .* got SelfInfluence"):
        log_result(result, [])


def test_error_classes_subclass_the_builtins_they_replace_and_are_public():
    """``except ValueError`` (or ``TypeError`` for a missing hook) written before the classes keeps working."""
    import lightning_dtda
    from lightning_dtda import errors

    assert issubclass(errors.MissingHookError, TypeError)
    for name in (
        "DatasetMismatchError",
        "UnfinishedRunError",
        "ReplayMismatchError",
        "UnsupportedLayerError",
        "UnsupportedTrainingError",
        "CorruptFileError",
    ):
        cls = getattr(errors, name)
        assert issubclass(cls, ValueError) and getattr(lightning_dtda, name) is cls and name in lightning_dtda.__all__
    assert lightning_dtda.hooks.MissingHookError is errors.MissingHookError


def test_gradient_chunks_smaller_than_batch_size_keep_the_effects_and_name_the_right_example(runs, data, monkeypatch):
    import lightning_dtda.model.gradients as gradients

    expected = Attributor(TinyClassifier, runs, data, estimator=Influence("ekfac"), progress=False).attribute(data)
    # Chunks of one example (the per-example gradients) and of one row (vectors through EK-FAC)
    monkeypatch.setattr(gradients, "CHUNK_BYTES", 1)
    chunked = Attributor(TinyClassifier, runs, data, estimator=Influence("ekfac"), progress=False).attribute(data)
    torch.testing.assert_close(chunked.effects, expected.effects, rtol=1e-5, atol=1e-7)
    x, y = data.tensors
    x = x.clone()
    x[3, 0] = float("nan")
    bad = TensorDataset(x, y)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients for examples \[3\]"):
        Attributor(TinyClassifier, runs, data, estimator=Influence("ekfac"), progress=False).attribute(bad)


def test_the_fingerprint_of_image_items_reads_their_pixels_not_their_repr():
    """A PIL image's repr holds a memory address: hashed, it made every read another item (the recorder then
    blamed a generator of the dataset's own) and said nothing of the pixels."""
    from PIL import Image

    from lightning_dtda.runs.fingerprint import changes_between_reads, fingerprint_dataset

    class Images(torch.utils.data.Dataset):
        def __init__(self, value):
            self.value = value

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.fromarray(np.full((4, 4), self.value + i, dtype=np.uint8)), i

    assert not changes_between_reads(Images(1))
    assert fingerprint_dataset(Images(1)) == fingerprint_dataset(Images(1)) != fingerprint_dataset(Images(2))


def test_weight_averaging_is_refused_by_every_estimator_and_retrain(tmp_path, data):
    """StochasticWeightAveraging leaves fit with an average the snapshots do not hold (a new-user trial: every
    effect off by 10-90x the largest, without a word): the recorder warns at the start, and nothing attributes it."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from lightning_dtda.evaluation import leave_one_out_weights, retrain

    model = TinyClassifier()
    pl.seed_everything(0)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)
    with pytest.warns(UserWarning, match=r"StochasticWeightAveraging will leave fit with an average"):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), swa], max_epochs=4).fit(
            model, DataLoader(data, batch_size=8, shuffle=True)
        )
    [run] = load_runs(tmp_path / "runs")
    assert run.manifest.weight_averaging == ("StochasticWeightAveraging",)
    final = run.state_dict(-1)
    assert max((final[k] - v).abs().max().item() for k, v in model.state_dict().items() if k in final) > 1e-3
    refusal = r"Runs trained with weight averaging: seed_0 \(StochasticWeightAveraging\)"
    for estimator in (Influence(), Unrolled()):
        with pytest.raises(UnsupportedTrainingError, match=refusal):
            Attributor(TinyClassifier, tmp_path / "runs", data, estimator=estimator, progress=False)
    with pytest.raises(UnsupportedTrainingError, match=refusal):
        retrain(TinyClassifier, tmp_path / "runs", data, data, leave_one_out_weights(16, [3]), progress=False)


def test_a_changing_accumulation_is_refused_before_any_replay(tmp_path, data):
    """GradientAccumulationScheduler changes the accumulation the replay divides by (a new-user trial: Unrolled's
    effects off by over 100% with a warning only, when it changed in the last epoch); Influence is unaffected."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    pl.seed_everything(0)
    with pytest.warns(UserWarning, match=r"GradientAccumulationScheduler changes training where no replay follows"):
        trainer(
            tmp_path, [TrajectoryRecorder(tmp_path / "runs"), GradientAccumulationScheduler({1: 2})], max_epochs=2
        ).fit(TinyClassifier(), DataLoader(data, batch_size=4, shuffle=True))
    [run] = load_runs(tmp_path / "runs")
    assert run.manifest.unreplayable_callbacks == ("GradientAccumulationScheduler",)
    with pytest.raises(UnsupportedTrainingError, match=r"GradientAccumulationScheduler changed its training"):
        Attributor(TinyClassifier, tmp_path / "runs", data, estimator=Unrolled(), progress=False).attribute(data)
    result = Attributor(TinyClassifier, tmp_path / "runs", data, estimator=Influence("ggn"), progress=False).attribute(
        data
    )
    assert torch.isfinite(result.effects).all()


def test_retrain_refuses_a_learning_rate_that_followed_a_validation_metric(tmp_path, data):
    """ReduceLROnPlateau lowers the rate when a validation loss stalls, which a removal can move (a new-user trial:
    20 of 40 removals lowered it three epochs earlier, effects off by more than their size)."""
    from lightning_dtda.evaluation import leave_one_out_weights, retrain

    class Plateau(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}

    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=2).fit(
        Plateau(), DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)
    )
    weights = leave_one_out_weights(16, [3])
    with pytest.raises(
        UnsupportedTrainingError, match=r"retrain cannot follow a validation metric: seed_0 \(ReduceLROnPlateau\)"
    ):
        retrain(Plateau, tmp_path / "runs", data, data, weights, progress=False)
    with pytest.warns(UserWarning, match=r"seed_0 \(ReduceLROnPlateau\) followed a validation metric"):
        Attributor(Plateau, tmp_path / "runs", data, estimator=Influence("ggn"), progress=False)
    truth = retrain(Plateau, tmp_path / "runs", data, data, weights, progress=False, as_recorded=True)
    assert truth.effects.abs().max() > 0


def test_parameters_the_optimizer_was_not_given_are_named_before_any_replay(tmp_path, data):
    """Only the head given to the optimizer, the body left requires_grad=True: training held the body fixed, and
    the replay trained it (a new-user trial: a late ReplayMismatchError 0.87 away, naming other causes)."""

    class HeadOnly(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        HeadOnly(), DataLoader(data, batch_size=8)
    )
    for estimator in (Unrolled(), Influence()):  # Influence attributed through the untrained body, without a word
        with pytest.raises(
            UnsupportedTrainingError,
            match=r"parameters net\.0\.weight, net\.0\.bias require gradients, but the run's optimizer was not given them",
        ):
            Attributor(HeadOnly, tmp_path / "runs", data, estimator=estimator, progress=False).attribute(data)


def test_half_precision_runs_say_how_few_digits_their_effects_carry(tmp_path, data):
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1, precision="bf16-true").fit(
        TinyClassifier(), DataLoader(data, batch_size=8)
    )
    with pytest.warns(UserWarning, match=r"precision='bf16-true', so their models compute in half precision"):
        Attributor(TinyClassifier, tmp_path / "runs", data, progress=False)
