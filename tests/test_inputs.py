"""Inputs of any structure and [B] outputs reach every curvature and the replay: a dict batch with a
keyword-only forward gives the effects of the same model called positionally."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from models import LinearRegression, Mapped, TinyClassifier, classification_data, regression_data, trainer
from oracles import dense_ggn_effects, relative_error
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, Segmented, TrajectoryRecorder, Unrolled


def Keywords(data):
    """``{"features": x, "label": y}`` examples, as a Hugging Face style dataset gives them."""
    return Mapped(data, lambda x, y: {"features": x, "label": y})


class KeywordOnly(TinyClassifier):
    def forward(self, *, features):
        return self.net(features)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(features=batch["features"]), batch["label"])

    def attribution_inputs_targets(self, batch):
        return {"features": batch["features"]}, batch["label"]


def record(tmp_path, name, make_model, data, epochs=3):
    pl.seed_everything(0)
    trainer(
        tmp_path, [TrajectoryRecorder(tmp_path / name, every_n_train_steps=4)], max_epochs=epochs, precision="64-true"
    ).fit(make_model(), DataLoader(data, batch_size=6, shuffle=True))
    return tmp_path / name


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same MLP, seed and batches, trained on (x, y) pairs and on dicts through a keyword-only forward."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    data, queries = (
        classification_data(n=18, dtype=torch.float64),
        classification_data(n=3, seed=1, dtype=torch.float64),
    )
    positional = record(tmp_path, "positional", lambda: TinyClassifier(hidden=5), data)
    keywords = record(tmp_path, "keywords", lambda: KeywordOnly(hidden=5), Keywords(data))
    return data, queries, positional, keywords


@pytest.mark.parametrize(
    "estimator",
    [
        Influence(curvature="ekfac"),
        Influence(curvature="kfac", damping=0.1),
        Influence(curvature="ggn", solver="dense"),
        Influence(curvature="ggn", solver="krylov", damping=0.1),
        Influence(curvature="identity", damping=1.0),
        Segmented(segments=2, curvature="ekfac"),
        Unrolled(),
    ],
    ids=lambda e: e.label + ("-" + e.solver if getattr(e, "solver", "auto") != "auto" else ""),
)
def test_a_keyword_only_forward_on_dict_batches_attributes_as_the_positional_model(both, estimator):
    data, queries, positional, keywords = both
    expected = Attributor(TinyClassifier, positional, data, estimator=estimator, progress=False).attribute(queries)
    result = Attributor(KeywordOnly, keywords, Keywords(data), estimator=estimator, progress=False).attribute(
        Keywords(queries)
    )
    assert torch.allclose(result.measurements, expected.measurements, atol=1e-12)
    assert relative_error(result.effects, expected.effects) < 1e-8 and expected.effects.abs().max() > 0


class Squeezed(LinearRegression):
    """One output returned as ``[B]``, trained against ``[B]`` targets."""

    def forward(self, x):
        return self.linear(x).squeeze(-1)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "ggn"])
def test_outputs_of_shape_b_work_for_every_curvature(tmp_path, curvature):
    """K-FAC of one linear layer under mean squared error is its exact GGN: the effects equal the dense
    solve of the same layer with [B, 1] outputs."""
    x, y = regression_data(n=20, dtype=torch.float64).tensors
    qx, qy = regression_data(n=3, seed=1, dtype=torch.float64).tensors
    data, queries = TensorDataset(x, y[:, 0]), TensorDataset(qx, qy[:, 0])
    runs = record(tmp_path, "runs", Squeezed, data)
    attributor = Attributor(
        Squeezed, runs, data, estimator=Influence(curvature=curvature, damping=0.05), progress=False
    )
    result = attributor.attribute(queries)
    layer = attributor.load_model(attributor.runs[0]).linear
    expected = dense_ggn_effects(layer, x, y, qx, qy, 0.05, loss="mse")[0]
    assert relative_error(result.effects[0], expected) < 1e-6


def Pairs(data):
    """``((x, (x_scale,)), y)`` examples: inputs a nested tuple, passed to forward as one argument."""
    return Mapped(data, lambda x, y: ((x[:3], (x[3:],)), y))


class TupleInputs(TinyClassifier):
    def forward(self, parts):
        head, (tail,) = parts
        return self.net(torch.cat([head, tail], -1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def attribution_inputs_targets(self, batch):
        return batch[0], batch[1]


@pytest.mark.parametrize(
    "estimator",
    [Influence(curvature="ekfac", damping=0.1), Influence(curvature="ggn", damping=0.1)],
    ids=lambda e: e.curvature,
)
def test_nested_tuple_inputs_attribute_as_the_positional_model(both, tmp_path, estimator):
    data, queries, positional, _ = both
    runs = record(tmp_path, "tuples", lambda: TupleInputs(hidden=5), Pairs(data))
    expected = Attributor(TinyClassifier, positional, data, estimator=estimator, progress=False).attribute(queries)
    result = Attributor(TupleInputs, runs, Pairs(data), estimator=estimator, progress=False).attribute(Pairs(queries))
    assert relative_error(result.effects, expected.effects) < 1e-8


class Augmented(torch.utils.data.Dataset):
    """A random flip and shift of every example, drawn from torch's global generator in ``__getitem__``, as
    torchvision's transforms draw them."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x + 0.1 * torch.randn((), dtype=x.dtype), y


def test_runs_recorded_on_randomly_augmented_data_load_and_attribute_with_every_influence_curvature(tmp_path):
    from lightning_dtda import UnsupportedTrainingError, load_runs

    data, queries = Augmented(classification_data(n=24, dtype=torch.float64)), classification_data(n=3, seed=1)
    for seed in (0, 1):
        pl.seed_everything(seed)
        trainer(
            tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=4)], max_epochs=2, precision="64-true"
        ).fit(TinyClassifier(), DataLoader(data, batch_size=6, shuffle=True))
    runs = load_runs(tmp_path / "runs")  # the fingerprint is the dataset's, not one random draw of it
    assert len(runs) == 2 and runs[0].dataset_fingerprint == runs[1].dataset_fingerprint
    queries = TensorDataset(*(t.double() if t.is_floating_point() else t for t in queries.tensors))
    for curvature in ("identity", "ggn", "kfac", "ekfac"):
        attributor = Attributor(TinyClassifier, runs, data, Influence(curvature, damping=0.1), progress=False)
        first, again = attributor.attribute(queries), attributor.attribute(queries)
        # One fixed augmented view per example: the same effects every time.
        assert torch.isfinite(first.effects).all() and torch.equal(first.effects, again.effects)
    # The replay cannot see the random views training drew: refused before any work, naming augmentation.
    with pytest.raises(UnsupportedTrainingError, match="drew random numbers when its items were read"):
        Attributor(TinyClassifier, runs, data, Unrolled(), progress=False).attribute(queries)


def test_a_float64_run_on_float32_data_attributes_as_lightning_fed_it(tmp_path):
    """precision='64-true' casts float32 inputs to float64 for training; attribution and retrain read the same
    datasets as training got them, and give what float64 datasets give."""
    from lightning_dtda import leave_one_out_weights, retrain

    data, queries = classification_data(n=18), classification_data(n=3, seed=1)  # float32
    runs = record(tmp_path, "runs", lambda: TinyClassifier(hidden=5), data)  # precision="64-true"
    as64 = [TensorDataset(*(t.double() if t.is_floating_point() else t for t in d.tensors)) for d in (data, queries)]
    runs64 = record(tmp_path, "runs64", lambda: TinyClassifier(hidden=5), as64[0])  # the same run, float64 data
    for estimator in (Influence("ggn", solver="dense"), Unrolled()):
        got = Attributor(TinyClassifier, runs, data, estimator, progress=False).attribute(queries)
        expected = Attributor(TinyClassifier, runs64, as64[0], estimator, progress=False).attribute(as64[1])
        assert got.effects.dtype == torch.float64 and relative_error(got.effects, expected.effects) < 1e-12
    weights = leave_one_out_weights(18, [2])
    got = retrain(TinyClassifier, runs, data, queries, weights, progress=False).effects
    assert relative_error(got, retrain(TinyClassifier, runs64, *as64, weights, progress=False).effects) < 1e-12
